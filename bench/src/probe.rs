//! The app's view of the shared Redis: a thread issuing one `GET` at a time, as a request does,
//! timing each. Latencies are kept per phase (idle, or a sweep running) so the bench can compare
//! the p99s (a sweep must never monopolise Redis: the table's `GET` target).
//!
//! A plain OS thread with a blocking connection, so the timings do not include waits for the
//! bench's async runtime, which also runs the worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::layout::Layout;
use crate::nodes::Router;
use crate::stats::Rng;
use crate::Size;

/// GETs sampled on the idle Redis before the daemon works.
const IDLE_PERIOD: Duration = Duration::from_secs(3);
/// Pause between GETs: an app doing ~1,000 reads a second, light enough not to slow the sweep.
const GET_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Off = 0,
    Idle = 1,
    Sweep = 2,
}

pub struct GetProbe {
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<[Vec<f64>; 3]>,
}

impl GetProbe {
    /// GETs go to the primary holding the key (`node_urls` in the router's order), as a cluster
    /// client sends them.
    pub fn start(node_urls: &[String], router: Router, layout: Layout) -> GetProbe {
        let phase = Arc::new(AtomicUsize::new(Phase::Off as usize));
        let stop = Arc::new(AtomicBool::new(false));
        let mut connections: Vec<redis::Connection> = node_urls
            .iter()
            .map(|url| {
                redis::Client::open(url.as_str())
                    .and_then(|client| client.get_connection())
                    .expect("the GET probe's redis connection")
            })
            .collect();
        let thread = {
            let phase = phase.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut samples: [Vec<f64>; 3] = Default::default();
                let mut rng = Rng::new(7);
                while !stop.load(Ordering::Relaxed) {
                    let current = phase.load(Ordering::Relaxed);
                    if current == Phase::Off as usize {
                        std::thread::sleep(GET_INTERVAL * 5);
                        continue;
                    }
                    let key = layout.some_key(rng.next_u64());
                    let connection = &mut connections[router.node_of(&key)];
                    let started = Instant::now();
                    let _: Option<Vec<u8>> = redis::cmd("GET")
                        .arg(&key)
                        .query(connection)
                        .expect("GET on the private redis");
                    let micros = started.elapsed().as_secs_f64() * 1e6;
                    // Attribute the sample only if the phase did not change under it.
                    if phase.load(Ordering::Relaxed) == current {
                        samples[current].push(micros);
                    }
                    std::thread::sleep(GET_INTERVAL);
                }
                samples
            })
        };
        GetProbe {
            phase,
            stop,
            thread,
        }
    }

    /// Starts the probe on the size's Redis and samples [`IDLE_PERIOD`] of idle `GET`s; returns
    /// with the phase still idle, for the caller to switch.
    pub async fn after_idle(size: &Size<'_>) -> GetProbe {
        let probe = GetProbe::start(
            &size.redis_server.node_urls(),
            size.redis_server.router(),
            size.layout,
        );
        probe.set(Phase::Idle);
        tokio::time::sleep(IDLE_PERIOD).await;
        probe
    }

    pub fn set(&self, phase: Phase) {
        self.phase.store(phase as usize, Ordering::Relaxed);
    }

    /// Stops the thread; returns the latencies (µs) sampled while idle and while sweeping.
    pub fn finish(self) -> (Vec<f64>, Vec<f64>) {
        self.stop.store(true, Ordering::Relaxed);
        let [_, idle, sweep] = self.thread.join().expect("the GET probe thread");
        (idle, sweep)
    }
}
