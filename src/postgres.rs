//! Connecting to Postgres: URL options (TLS with rustls, keepalives), the connection driver that
//! forwards notifications, and errors that never show the password.
//!
//! tokio-postgres parses `sslmode` only up to `require`; libpq users also write `verify-ca`,
//! `verify-full` and `sslrootcert=FILE`, so those are taken out of the URL here and turned into a
//! rustls configuration with libpq's meaning: `prefer`/`require` encrypt without checking the
//! certificate (unless `sslrootcert` is given), `verify-ca` checks the chain, `verify-full` also the
//! host name.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use crate::settings::SecretUrl;

/// Dead peers (a host gone, a cable pulled) are noticed after about idle + interval × retries.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged writes fail after this long instead of the kernel's ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("database URL {url} is not valid: {message}")]
    InvalidUrl { url: String, message: String },
    #[error("cannot read sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("cannot connect to Postgres at {url}: {}", describe(.source))]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
}

/// An error with its reason. tokio-postgres' `Display` names only the kind ("db error", "error
/// connecting to server"); the server's message or the OS error is its source, and a log line
/// without it cannot say why a connection went away. Neither ever holds the password.
pub fn describe(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

/// TLS requirements taken from the URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TlsMode {
    Disable,
    /// Encrypt; check the certificate only when a root certificate was given.
    Encrypt {
        required: bool,
    },
    VerifyCa,
    VerifyFull,
}

/// A parsed database URL: the tokio-postgres config plus the TLS options it cannot hold.
#[derive(Clone)]
pub struct PgTarget {
    config: Config,
    tls: TlsMode,
    root_cert: Option<String>,
    redacted: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

impl PgTarget {
    pub fn parse(url: &SecretUrl, application_name: &str) -> Result<PgTarget, ConnectError> {
        let redacted = url.redacted();
        let invalid = |message: String| ConnectError::InvalidUrl {
            url: redacted.clone(),
            message,
        };
        let mut parsed = url::Url::parse(url.expose()).map_err(|e| invalid(e.to_string()))?;
        let mut sslmode = None;
        let mut root_cert = None;
        let kept: Vec<(String, String)> = parsed
            .query_pairs()
            .filter_map(|(name, value)| match name.as_ref() {
                "sslmode" => {
                    sslmode = Some(value.into_owned());
                    None
                }
                "sslrootcert" => {
                    root_cert = Some(value.into_owned());
                    None
                }
                _ => Some((name.into_owned(), value.into_owned())),
            })
            .collect();
        if kept.is_empty() {
            parsed.set_query(None);
        } else {
            parsed.query_pairs_mut().clear().extend_pairs(kept);
        }
        let tls = match sslmode.as_deref() {
            None | Some("prefer") | Some("allow") => TlsMode::Encrypt { required: false },
            Some("disable") => TlsMode::Disable,
            Some("require") => TlsMode::Encrypt { required: true },
            Some("verify-ca") => TlsMode::VerifyCa,
            Some("verify-full") => TlsMode::VerifyFull,
            Some(other) => {
                return Err(invalid(format!(
                    "sslmode={other} (expected disable, prefer, require, verify-ca or verify-full)"
                )))
            }
        };
        let mut config: Config = parsed
            .as_str()
            .parse()
            .map_err(|e: tokio_postgres::Error| invalid(e.to_string()))?;
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Encrypt { required: false } => SslMode::Prefer,
            _ => SslMode::Require,
        });
        if config.get_application_name().is_none() {
            config.application_name(application_name);
        }
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Ok(PgTarget {
            config,
            tls,
            root_cert,
            redacted,
        })
    }

    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    /// The same target under another `application_name` (how `status` recognises workers).
    pub fn with_application_name(&self, name: &str) -> PgTarget {
        let mut target = self.clone();
        target.config.application_name(name);
        target
    }

    fn rustls_config(&self) -> Result<rustls::ClientConfig, ConnectError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConnectError::InvalidUrl {
                url: self.redacted.clone(),
                message: e.to_string(),
            })?;
        let roots = self.root_store()?;
        let verify = match self.tls {
            TlsMode::VerifyCa | TlsMode::VerifyFull => true,
            TlsMode::Encrypt { .. } => self.root_cert.is_some(),
            TlsMode::Disable => false,
        };
        if !verify {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth());
        }
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ConnectError::RootCert {
                    path: self.root_cert.clone().unwrap_or_default(),
                    message: e.to_string(),
                })?;
        if self.tls == TlsMode::VerifyFull {
            return Ok(builder.with_webpki_verifier(webpki).with_no_client_auth());
        }
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            .with_no_client_auth())
    }

    fn root_store(&self) -> Result<rustls::RootCertStore, ConnectError> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.root_cert {
            Some(path) => {
                let error = |message: String| ConnectError::RootCert {
                    path: path.clone(),
                    message,
                };
                let pem = std::fs::read(path).map_err(|e| error(e.to_string()))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| error(e.to_string()))?;
                    roots.add(cert).map_err(|e| error(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(error("no PEM certificate in the file".to_owned()));
                }
            }
            None => {
                // Like libpq without sslrootcert: the system's trust store.
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        Ok(roots)
    }

    /// Connects, spawning the driver task. Notifications wake `on_notification` when given; the
    /// returned handle ends when the connection closes, with the error that closed it.
    pub async fn connect(
        &self,
        on_notification: Option<Arc<Notify>>,
    ) -> Result<(Client, Driver), ConnectError> {
        let connect_error = |source| ConnectError::Connect {
            url: self.redacted.clone(),
            source,
        };
        if self.tls == TlsMode::Disable {
            let (client, connection) = self.config.connect(NoTls).await.map_err(connect_error)?;
            return Ok((client, drive(connection, on_notification)));
        }
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
        let (client, connection) = self.config.connect(tls).await.map_err(connect_error)?;
        Ok((client, drive(connection, on_notification)))
    }
}

/// The task polling one connection. It ends when the connection closes: `Err` with the reason when
/// the server or the network closed it (a terminated backend, a restart), `Ok` when the client was
/// dropped.
pub type Driver = JoinHandle<Result<(), tokio_postgres::Error>>;

/// Polls the connection. A connection simply spawned with `tokio::spawn(conn)` drops
/// notifications; this forwards them as a wake-up (the payload is constant, only the event counts).
fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    on_notification: Option<Arc<Notify>>,
) -> Driver
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if let Some(wake) = &on_notification {
                        wake.notify_one();
                    }
                }
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(message = notice.message(), "postgres notice");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "postgres connection closed");
                    return Err(error);
                }
            }
        }
        Ok(())
    })
}

/// `sslmode=prefer`/`require` without a root certificate: encrypt, trust any certificate (libpq's
/// documented behaviour for these modes).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to the root certificate; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_ssl_options_are_understood_and_errors_are_redacted() {
        let url =
            SecretUrl::new("postgres://u:pw@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem");
        let target = PgTarget::parse(&url, "test").expect("parses");
        assert_eq!(target.tls, TlsMode::VerifyFull);
        assert_eq!(target.root_cert.as_deref(), Some("/ca.pem"));
        let bad = SecretUrl::new("postgres://u:pw@db/x?sslmode=sometimes");
        let message = PgTarget::parse(&bad, "test")
            .expect_err("bad mode")
            .to_string();
        assert!(message.contains("sslmode=sometimes"), "{message}");
        assert!(!message.contains("pw@"), "{message}");
    }
}
