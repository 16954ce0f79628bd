//! The process around the worker: signals (SIGTERM/SIGINT stop, SIGHUP reloads the rules), the
//! shared health state, and the metrics listener.

use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::postgres::PgTarget;
use crate::rules::RuleSet;
use crate::schema;
use crate::settings::{RulesSource, Settings};
use crate::telemetry::Health;
use crate::worker::{self, RunError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] crate::telemetry::MetricsError),
}

/// `cache-invalidator run`: the worker until SIGTERM or SIGINT.
pub async fn run_daemon(settings: Settings) -> Result<(), DaemonError> {
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::new(settings.max_backlog_age));
    let (rules_tx, rules_rx) = watch::channel(Arc::new(settings.rules.clone()));

    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let signals = {
        let shutdown = shutdown.clone();
        let settings = settings.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = terminate.recv() => { info!("SIGTERM received"); break }
                    _ = interrupt.recv() => { info!("SIGINT received"); break }
                    _ = hangup.recv() => reload_rules(&settings, &rules_tx).await,
                    _ = shutdown.cancelled() => return,
                }
            }
            shutdown.cancel();
        })
    };
    if let Some(addr) = settings.metrics_addr {
        crate::telemetry::serve_metrics(addr, health.clone(), shutdown.clone()).await?;
    }
    let result = worker::run_with_rules(settings, rules_rx, health, shutdown.clone()).await;
    shutdown.cancel();
    let _ = signals.await;
    Ok(result?)
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
            return;
        }
    };
    let differences = async {
        let target = PgTarget::parse(
            &settings.connections.database_url,
            "cache-invalidator reload",
        )
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
        }
        Err(err) => {
            warn!(error = %err, "SIGHUP: cannot compare the rules with the installed triggers; keeping the old rules")
        }
    }
}
