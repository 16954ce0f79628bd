//! The `cache-invalidator` binary: parse the command line, set up logging, turn SIGTERM and SIGINT
//! into a stop, and run the subcommand through the library.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use anyhow::Context;
use cache_invalidator::cli::{Cli, Command};
use cache_invalidator::settings::{LogFormat, Settings};
use cache_invalidator::{ops, telemetry};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// One thread: the daemon's work is a chain of replies, which crossed threads on a multi-threaded
/// runtime, costing more CPU for no better latency (docs/design.md, "One thread").
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            tracing::error!("{}", ops::join_causes(error.chain().map(|e| e.to_string())));
            ExitCode::from(2)
        }
    }
}

/// `Ok(false)` is a clean "no" (a failed check, an unhealthy status).
async fn run(cli: Cli) -> anyhow::Result<bool> {
    let settings = Settings::load(cli.given());
    // Logging as configured; when the settings are what is wrong, as far as the command line says.
    let fallback = cli.global.log_format.unwrap_or(LogFormat::Text);
    telemetry::init_logging(settings.as_ref().map_or(fallback, |s| s.log_format));
    let settings = settings.context("settings")?;
    let shutdown = CancellationToken::new();
    // Only the daemon waits for a stop: the other subcommands keep the signals' default (exit).
    if matches!(cli.command, Command::Run(_)) {
        stop_on(&shutdown).context("cannot install signal handlers")?;
    }
    cache_invalidator::execute(cli.command, settings, shutdown).await
}

/// Cancels `shutdown` at the first SIGTERM or SIGINT: the daemon finishes its batch and exits.
fn stop_on(shutdown: &CancellationToken) -> std::io::Result<()> {
    let (mut terminate, mut interrupt) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
    );
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM received"),
            _ = interrupt.recv() => tracing::info!("SIGINT received"),
        }
        shutdown.cancel();
    });
    Ok(())
}
