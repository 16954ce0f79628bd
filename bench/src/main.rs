//! `bench`: measures the daemon against the physical floor and the naive approach, on data it
//! builds itself. Run it from the repository root:
//!
//! ```text
//! cargo run --release -p cache-invalidator-bench -- [--quick] [--keys N[,N…]] [--cluster] [--only …]
//! ```
//!
//! Per keyspace size: a private `redis-server` filled with a django-redis keyspace, a scratch
//! Postgres database with the four report tables and the daemon's triggers, the one-pass
//! reference, the daemon in-process against them (one change on an idle worker, a burst of 1,000
//! committed changes), and the naive `delete_pattern` way on a sample. On the largest size also the
//! triggers' cost on the app's writes and a sustained load from a separate process against the
//! daemon running as its own process. Prints one table; progress goes to stderr.
//!
//! `--only drain` commits a backlog of 200,000 single-row changes in one transaction on the size
//! nearest 1M keys (the size its target is set for) and times the daemon (its own process, each
//! mode) draining it, with its CPU.
//! `--repeat N` runs index mode's sustained load N times in a row.
//!
//! `--only users` measures something else on a keyspace of its own: 6,000 `invalidate_user` calls
//! in one statement on 200,000 report keys, and how long they hold an unrelated change back.
//! The sweep rows ([`sweep_mode`]) run the daemon with `--mode sweep`; the index-mode rows
//! ([`index_mode`]) run the same measures with `--mode index` beside them. Every row's target is
//! defined once, in [`table`].
//!
//! `--cluster` measures the same against a private Redis Cluster of three primaries on this
//! machine (the daemon at `redis+cluster://…`): every `SCAN` pass, the reference's and the naive
//! way's, runs on all primaries in parallel, as the daemon's sweep does. The trigger-overhead rows
//! are left out there: they measure Postgres alone, and the single-server run has them.

mod daemon;
mod drain;
mod index_mode;
mod layout;
mod measure;
mod nodes;
mod probe;
mod scratch;
mod server_side;
mod stats;
mod sustained;
mod sweep_mode;
mod table;
mod users;

use std::path::Path;
use std::time::{Duration, Instant};

use cache_invalidator::rules::RuleSet;
use cache_invalidator::settings::Mode as FindMode;
use clap::{Parser, Subcommand};
use tokio_postgres::Client;

use crate::layout::Layout;
use crate::nodes::Nodes;
use crate::scratch::{PrivateRedis, ScratchDb};
use crate::stats::{show, thousands};
use crate::table::{Judged, Line};

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Measures cache-invalidator against one SCAN pass and the naive way"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Mode>,
    /// 100k keys and a 10 s sustained run: under a minute
    #[arg(long)]
    quick: bool,
    /// Keyspaces of about N keys each instead of the default sizes (100k and 1M; --quick: 100k);
    /// comma-separate several (e.g. 1000000,5000000): index mode compares each to the first
    #[arg(long, value_delimiter = ',')]
    keys: Vec<u64>,
    /// Postgres server the scratch database is created on
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432/postgres")]
    database_url: String,
    /// Seconds of sustained load [default: 60; --quick: 10]
    #[arg(long)]
    sustained_seconds: Option<u64>,
    /// Against a private Redis Cluster of 3 primaries instead of one redis-server
    #[arg(long)]
    cluster: bool,
    /// Run only these measures (repeat or comma-separate); the reference pass always runs
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Measures>,
    /// Runs index mode's sustained load this many times in a row, a line each (its target asks
    /// for 3 consecutive runs)
    #[arg(long, default_value_t = 1)]
    repeat: u32,
}

/// Groups of measures `--only` can pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Measures {
    /// Idle change, burst, naive way and the app's GET latency
    Sweeps,
    /// Trigger overhead on single-row and 10,000-row UPDATEs
    Triggers,
    /// Sustained load: backlog age and the worker's memory
    Sustained,
    /// The client-side sweep against a server-side Lua sweep (one server only)
    Lua,
    /// 6,000 `invalidate_user` in one statement and an unrelated change, on a keyspace of its own
    /// (200,000 report keys, whatever --keys says)
    Users,
    /// Index mode: index complete after start, idle change, burst, the app's GET latency,
    /// sustained load (first size; --repeat runs it several times) and memory per indexed key
    /// (largest size)
    Index,
    /// Both modes: a backlog of 200,000 single-row changes committed in one transaction, drained
    /// by the daemon as its own process: changes/s and its CPU per 100,000 changes (the size
    /// nearest 1M keys, after the other groups: it removes most report keys)
    Drain,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// The sustained measure's load process (started by the bench itself)
    #[command(hide = true)]
    Load(sustained::LoadArgs),
}

/// Changes in the burst (1,000, as the targets define it).
const BURST_CHANGES: usize = 1_000;
/// Changes the naive approach is timed on; 1,000 of them would take an hour at 1M keys.
const NAIVE_SAMPLE: usize = 20;
/// Repeats of the single-change measure (its median is reported).
const IDLE_REPEATS: usize = 7;
/// Primaries of the `--cluster` run (three, the fewest `redis-cli --cluster create` accepts).
const CLUSTER_PRIMARIES: usize = 3;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Some(Mode::Load(args)) = cli.command {
        sustained::load(args).await;
        return;
    }
    // The daemon's own log lines, when asked for (e.g. RUST_LOG=cache_invalidator=info).
    if std::env::var_os("RUST_LOG").is_some() {
        cache_invalidator::telemetry::init_logging(cache_invalidator::settings::LogFormat::Text);
    }
    let worker_binary = sustained::worker_binary();
    // The run's duration, without the build of the daemon's binary just above.
    let started = Instant::now();
    let rules = RuleSet::builtin();
    let mut lines = Vec::new();
    // Index mode's figures at the first size, which the larger sizes are compared with.
    let mut index_base = None;
    for options in sizes(&cli) {
        let url = &cli.database_url;
        lines.extend(measure_size(url, &rules, &worker_binary, &options, &mut index_base).await);
    }
    if cli.only.is_empty() || cli.only.contains(&Measures::Users) {
        for mode in [FindMode::Sweep, FindMode::Index] {
            let bulk = users::measure(&cli.database_url, &rules, cli.cluster, mode).await;
            lines.extend(users::lines(&bulk));
        }
    }
    if cli.cluster {
        println!(
            "Redis Cluster, {CLUSTER_PRIMARIES} primaries (private redis-servers on this machine, \
             no replicas; the daemon at `redis+cluster://…`)\n"
        );
    } else {
        println!("one redis-server (private, on this machine)\n");
    }
    table::print(&lines);
    println!(
        "\nmachine: {} cores, {}, {}; run took {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        command_line("redis-server", &["--version"]),
        postgres_version(&cli.database_url).await,
        show(started.elapsed())
    );
}

/// The keyspace sizes the run measures, with what to measure on each.
fn sizes(cli: &Cli) -> Vec<SizeOptions> {
    // The users measure brings its own keyspace: alone, it needs none of the sized ones.
    if !cli.only.is_empty() && cli.only.iter().all(|m| *m == Measures::Users) {
        return Vec::new();
    }
    let sizes = match (cli.keys.is_empty(), cli.quick) {
        (false, _) => cli.keys.clone(),
        (true, true) => vec![100_000],
        (true, false) => vec![100_000, 1_000_000],
    };
    let sustained_seconds = cli
        .sustained_seconds
        .unwrap_or(if cli.quick { 10 } else { 60 });
    let drain_size = drain::size_index(&sizes);
    (0..sizes.len())
        .map(|index| SizeOptions {
            keys: sizes[index],
            largest: index + 1 == sizes.len(),
            drain: Some(index) == drain_size,
            quick: cli.quick,
            sustained_seconds,
            cluster: cli.cluster,
            only: cli.only.clone(),
            first: index == 0,
            repeat: cli.repeat,
        })
        .collect()
}

pub struct SizeOptions {
    keys: u64,
    largest: bool,
    /// The drain runs on this size ([`drain::size_index`]).
    drain: bool,
    quick: bool,
    sustained_seconds: u64,
    /// A private Redis Cluster of [`CLUSTER_PRIMARIES`] instead of one server.
    cluster: bool,
    /// Measures to run; empty for all of them.
    only: Vec<Measures>,
    /// The run's first size (index mode's sustained load runs there).
    first: bool,
    /// Runs of index mode's sustained load.
    repeat: u32,
}

impl SizeOptions {
    fn runs(&self, measures: Measures) -> bool {
        self.only.is_empty() || self.only.contains(&measures)
    }
}

/// One keyspace size, set up: what every group of measures on it needs.
pub struct Size<'a> {
    /// The keyspace's size as the table prints it.
    pub keys: String,
    pub layout: Layout,
    /// One `SCAN MATCH` pass over this keyspace (median of 3).
    pub reference: Duration,
    pub redis_server: &'a PrivateRedis,
    pub redis: &'a Nodes,
    pub db_url: &'a str,
    pub client: &'a Client,
    pub poller: &'a Client,
    pub rules: &'a RuleSet,
    pub worker_binary: &'a Path,
    pub options: &'a SizeOptions,
}

impl Size<'_> {
    /// A line of the table at this size.
    pub fn line(
        &self,
        measure: impl Into<String>,
        value: String,
        ratio: String,
        judged: Judged,
    ) -> Line {
        Line::new(measure, &self.keys, value, ratio, judged)
    }

    /// `duration` in passes of the reference.
    pub fn passes(&self, duration: Duration) -> f64 {
        duration.as_secs_f64() / self.reference.as_secs_f64()
    }
}

/// Sets one keyspace size up (a private Redis filled with it, a scratch database), runs the
/// groups of measures on it and tears it down.
async fn measure_size(
    admin_url: &str,
    rules: &RuleSet,
    worker_binary: &Path,
    options: &SizeOptions,
    index_base: &mut Option<index_mode::Figures>,
) -> Vec<Line> {
    let layout = Layout::for_keys(options.keys);
    let redis_server = if options.cluster {
        PrivateRedis::start_cluster(CLUSTER_PRIMARIES)
    } else {
        PrivateRedis::start()
    };
    let redis = Nodes::connect(&redis_server.node_urls(), redis_server.router()).await;
    let fill_started = Instant::now();
    let keys = thousands(layout::fill(&redis, &layout).await);
    eprintln!(
        "[{keys} keys] filled the private redis (pid {:?}) in {}",
        redis_server.pids(),
        show(fill_started.elapsed())
    );
    let db = ScratchDb::create(admin_url, &layout, rules).await;
    let client = db.client().await;
    let poller = db.client().await;
    let reference = measure::reference(&redis).await;
    eprintln!("[{keys} keys] reference pass {}", show(reference));
    let size = Size {
        keys,
        layout,
        reference,
        redis_server: &redis_server,
        redis: &redis,
        db_url: &db.url,
        client: &client,
        poller: &poller,
        rules,
        worker_binary,
        options,
    };
    let lines = measure_groups(&size, index_base).await;
    drop(client);
    drop(poller);
    db.drop().await;
    drop(redis_server);
    lines
}

/// The groups of measures `--only` picks, on one size; the lines in the table's order.
async fn measure_groups(
    size: &Size<'_>,
    index_base: &mut Option<index_mode::Figures>,
) -> Vec<Line> {
    let options = size.options;
    let mut lines = vec![sweep_mode::reference_line(size)];
    // Postgres alone: measured in the single-server run only, before the sweeps change rows.
    let triggers = if options.largest && !options.cluster && options.runs(Measures::Triggers) {
        Some(sweep_mode::trigger_cost(size).await)
    } else {
        None
    };
    // Which rows the measures changed, so each picks rows whose keys are still cached.
    let mut rows = measure::Rows::new(size.layout, options.keys);
    if options.runs(Measures::Sweeps) {
        lines.extend(sweep_mode::sweeps(size, &mut rows).await);
    }
    if options.runs(Measures::Index) {
        let (index_lines, figures) =
            index_mode::measure(size, &mut rows, index_base.as_ref()).await;
        lines.extend(index_lines);
        index_base.get_or_insert(figures);
    }
    // A script cannot `UNLINK` keys of several hash slots on a cluster node, so the Lua sweep is
    // measured on one server only.
    if !options.cluster && options.runs(Measures::Lua) {
        lines.extend(sweep_mode::lua(size, &mut rows).await);
    }
    if let Some(cost) = triggers {
        lines.extend(sweep_mode::trigger_lines(size, &cost));
    }
    if options.drain && options.runs(Measures::Drain) {
        lines.extend(drain::lines(size).await);
    }
    if options.largest && options.runs(Measures::Sustained) {
        lines.extend(sweep_mode::sustained(size).await);
    }
    lines
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|output| {
            let text = String::from_utf8_lossy(&output.stdout);
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| format!("{program}: unknown version"))
}

async fn postgres_version(url: &str) -> String {
    let client = scratch::connect(url).await;
    let version: String = client
        .query_one("SHOW server_version", &[])
        .await
        .map(|row| row.get(0))
        .unwrap_or_default();
    format!("PostgreSQL {version}")
}
