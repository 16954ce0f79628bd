//! The `cache-invalidator` binary: parse the command line, set up logging, call the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use cache_invalidator::cli::{Cli, Command};
use cache_invalidator::settings::{LogFormat, Settings};
use cache_invalidator::{ops, schema, telemetry};
use clap::Parser;

/// One thread: the daemon's work is a chain of replies (a `SCAN` reply is parsed, matched, and
/// the lane's next request sent), and on a multi-threaded runtime each reply crossed from the
/// thread driving the connection to the thread running the sweep. Measured with the bench's
/// sustained load at 1M keys (`--only sustained`, four alternating pairs of runs), one thread used
/// 23–28 % of a core against 30–35 %, leaving the difference to Redis on the shared cores, and
/// its backlog-age p99 was as good or better in each pair. The price: a burst on otherwise idle
/// cores, where a second thread could parse replies beside the sweep, took 1.36–1.61 × the
/// reference pass against 1.11–1.24 × (README, Performance).
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = Settings::load(cli.given());
    // Logging as configured; when the settings are what is wrong, as far as the command line says.
    let log_format = match &settings {
        Ok(settings) => settings.log_format,
        Err(_) => cli.global.log_format.unwrap_or(LogFormat::Text),
    };
    telemetry::init_logging(log_format);
    let outcome = match settings.context("settings") {
        Ok(settings) => execute(cli.command, settings).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            tracing::error!("{}", ops::join_causes(error.chain().map(|e| e.to_string())));
            ExitCode::from(2)
        }
    }
}

/// Runs one subcommand; `Ok(false)` is a clean "no" (a failed check, an unhealthy status).
async fn execute(command: Command, settings: Settings) -> anyhow::Result<bool> {
    match command {
        Command::Run(_) => cache_invalidator::daemon::run_daemon(settings).await?,
        Command::Install => println!("{}", ops::install(&settings).await?),
        Command::Uninstall => println!("{}", ops::uninstall(&settings).await?),
        Command::Sql { uninstall: false } => print!("{}", schema::install_sql(&settings.rules)),
        Command::Sql { uninstall: true } => print!("{}", schema::uninstall_sql()),
        Command::Check => {
            let (ok, report) = ops::check(&settings).await;
            print!("{report}");
            return Ok(ok);
        }
        Command::Status { max_age } => {
            let max_age = max_age.unwrap_or(settings.max_backlog_age);
            let (healthy, report) = ops::status(&settings, max_age).await?;
            print!("{report}");
            return Ok(healthy);
        }
        Command::Invalidate(args) => {
            let patterns = match (&args.user, &args.report) {
                (Some(user), _) => settings.rules.user_patterns(user),
                (None, Some(report)) => settings.rules.report_patterns(report),
                (None, None) => unreachable!("clap requires --user or --report"),
            };
            print!(
                "{}",
                ops::invalidate(&settings, patterns, args.dry_run).await?
            );
        }
        Command::Explain { table, row } => {
            print!("{}", ops::explain(&settings.rules, &table, &row)?)
        }
        Command::RetryDeadLetters { id } => {
            println!("{}", ops::retry_dead_letters(&settings, &id).await?)
        }
    }
    Ok(true)
}
