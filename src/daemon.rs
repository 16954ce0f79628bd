//! The running daemon around the worker ([`run`]): SIGHUP reloads the rules, the shared health
//! state with its Redis probe (which also wakes a worker waiting to reconnect once
//! Redis answers again), systemd's status line, and the metrics listener.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::redis_nodes::{Node, NodeError, RedisTarget};
use crate::rules::RuleSet;
use crate::schema;
use crate::settings::{RulesSource, Settings};
use crate::telemetry::{self, names, Health};
use crate::worker::{self, RunError};

/// How often the Redis probe PINGs: `/healthz` and the watchdog see a dead Redis within about
/// this long even while no change is being swept.
const REDIS_PROBE_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::MetricsError),
}

/// `cache-invalidator run`, the daemon's one entry point (the binary, the tests and the bench all
/// start it here): the worker, the metrics listener when `settings.metrics_addr` asks for one, the
/// Redis probe, systemd's status line and SIGHUP's rules reload, until `shutdown` is cancelled (the
/// binary cancels it on SIGTERM or SIGINT); then the batch in flight is finished and everything
/// stops.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> Result<(), DaemonError> {
    pace_for_watchdog(&mut settings);
    // The daemon's own tasks stop on a child token: ending them must not cancel the caller's.
    let shutdown = shutdown.child_token();
    let health = health_state(&settings);
    let (rules_tx, rules_rx) = watch::channel(Arc::new(settings.rules.clone()));

    let signals = reload_on_hangup(settings.clone(), rules_tx, shutdown.clone())?;
    // Bound before the worker starts: a port in use fails the start with a clear message. (After
    // the signal handlers: once /metrics answers, a SIGHUP reloads rather than kills.)
    let metrics = match start_metrics(&settings, &health, &shutdown).await {
        Ok(metrics) => metrics,
        Err(error) => {
            shutdown.cancel();
            let _ = signals.await;
            return Err(error.into());
        }
    };
    // An unparsable URL is left to the worker, which reports it and exits.
    let probe = settings.redis_target().ok().map(|target| {
        tokio::spawn(probe_redis(
            target,
            settings.redis_timeout,
            health.clone(),
            shutdown.clone(),
        ))
    });
    let status = tokio::spawn(telemetry::report_status(health.clone(), shutdown.clone()));
    let result = worker::run_with_rules(settings, rules_rx, health, shutdown.clone()).await;
    shutdown.cancel();
    let _ = signals.await;
    let _ = status.await;
    if let Some(probe) = probe {
        let _ = probe.await;
    }
    if let Some(metrics) = metrics {
        metrics.stopped().await;
    }
    Ok(result?)
}

/// The daemon's health state: its own, unless a test handed it one to watch (`Settings::health`).
fn health_state(settings: &Settings) -> Arc<Health> {
    #[cfg(feature = "test-hooks")]
    if let Some(health) = &settings.health {
        return health.clone();
    }
    Arc::new(Health::new(settings.max_backlog_age))
}

/// The worker pings systemd's watchdog from its loop, which idles up to one poll interval: an idle
/// loop must come round at least once per ping period (a quarter of the watchdog interval). With
/// the unit's WatchdogSec=30s that is 7.5 s, above the 5 s default: no change.
fn pace_for_watchdog(settings: &mut Settings) {
    if let Some(period) = telemetry::Systemd::from_env().ping_period() {
        if settings.poll_interval > period {
            info!(
                poll_interval_ms = settings.poll_interval.as_millis() as u64,
                watchdog_ping_ms = period.as_millis() as u64,
                "poll interval lowered to the systemd watchdog's ping period"
            );
            settings.poll_interval = period;
        }
    }
}

/// Reloads the rules at each SIGHUP until `shutdown`.
fn reload_on_hangup(
    settings: Settings,
    rules_tx: watch::Sender<Arc<RuleSet>>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, DaemonError> {
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                // A reload may wait up to Postgres' connect timeout: a stop request wins.
                _ = hangup.recv() => tokio::select! {
                    _ = reload_rules(&settings, &rules_tx) => {}
                    _ = shutdown.cancelled() => { info!("stopping; reload abandoned"); return }
                },
                _ = shutdown.cancelled() => return,
            }
        }
    }))
}

/// The `/metrics` and `/healthz` listener, when the settings ask for one, with the counters every
/// dashboard expects registered at zero.
async fn start_metrics(
    settings: &Settings,
    health: &Arc<Health>,
    shutdown: &CancellationToken,
) -> Result<Option<telemetry::MetricsServer>, telemetry::MetricsError> {
    let Some(addr) = settings.metrics_addr else {
        return Ok(None);
    };
    let server = telemetry::serve_metrics(addr, health.clone(), shutdown.clone()).await?;
    let tables = settings.rules.table_names();
    telemetry::register_zeroes(tables.iter().map(String::as_str));
    Ok(Some(server))
}

/// PINGs every Redis node each [`REDIS_PROBE_INTERVAL`] on a connection of its own and records
/// the answer in `health`: the worker only learns that Redis is gone at its next step, which may
/// be long in coming when nothing changes.
async fn probe_redis(
    target: RedisTarget,
    timeout: Duration,
    health: Arc<Health>,
    shutdown: CancellationToken,
) {
    let mut nodes: Option<Vec<Node>> = None;
    let mut answered = true;
    let mut ticker = tokio::time::interval(REDIS_PROBE_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let outcome = match tokio::time::timeout(timeout, ping(&target, &mut nodes)).await {
            Ok(outcome) => outcome.map_err(|error| error.to_string()),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        match outcome {
            Ok(()) => {
                if !answered {
                    info!(redis = target.redacted(), "redis answers PING again");
                }
                answered = true;
            }
            Err(error) => {
                if answered {
                    warn!(redis = target.redacted(), %error, "redis does not answer PING: unhealthy");
                } else {
                    debug!(%error, "redis still does not answer PING");
                }
                answered = false;
                // Reconnect from scratch next time: the old connection may be half dead.
                nodes = None;
            }
        }
        health.set_redis_answers(answered);
    }
}

async fn ping(target: &RedisTarget, nodes: &mut Option<Vec<Node>>) -> Result<(), NodeError> {
    if nodes.is_none() {
        *nodes = Some(target.connect().await?);
    }
    for node in nodes.iter_mut().flatten() {
        redis::cmd("PING")
            .query_async::<String>(&mut node.connection)
            .await
            .map_err(|source| NodeError::Redis {
                node: node.name.clone(),
                source,
            })?;
    }
    Ok(())
}

/// SIGHUP: load the rules file again. New rules are applied only when the installed triggers
/// record what they need; otherwise the old rules stay and the reason is logged.
async fn reload_rules(settings: &Settings, rules_tx: &watch::Sender<Arc<RuleSet>>) {
    let path = match &settings.rules_source {
        RulesSource::Builtin => {
            info!("SIGHUP: built-in rules in use, nothing to reload");
            return;
        }
        RulesSource::File(path) => path.clone(),
    };
    let rules = match RuleSet::load(&path) {
        Ok(rules) => rules,
        Err(err) => {
            error!(error = %err, "SIGHUP: rules not reloaded, keeping the old ones");
            reloaded("rejected");
            return;
        }
    };
    let differences = async {
        let target = settings
            .postgres_target("cache-invalidator reload")
            .map_err(|e| e.to_string())?;
        let (client, _driver) = target.connect(None).await.map_err(|e| e.to_string())?;
        schema::installed_differences(&client, &rules)
            .await
            .map_err(|e| e.to_string())
    }
    .await;
    match differences {
        Ok(differences) if differences.is_empty() => {
            info!(rules = %path.display(), tables = rules.rules().len(), "SIGHUP: rules reloaded");
            rules_tx.send_replace(Arc::new(rules));
            reloaded("applied");
        }
        Ok(differences) => {
            let problems: Vec<String> = differences
                .iter()
                .map(|d| format!("{}: {}", d.table, d.problem))
                .collect();
            error!(
                differences = %problems.join("; "),
                "SIGHUP: new rules do not match the installed triggers (run `cache-invalidator install` first); keeping the old rules"
            );
            reloaded("rejected");
        }
        Err(err) => {
            warn!(error = %err, "SIGHUP: cannot compare the rules with the installed triggers; keeping the old rules");
            reloaded("rejected");
        }
    }
}

fn reloaded(result: &'static str) {
    metrics::counter!(names::RULES_RELOADS, "result" => result).increment(1);
}
