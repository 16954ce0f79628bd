//! Connecting to Postgres: URL options (TLS with rustls, keepalives), the connection driver that
//! forwards notifications, and errors that never show the password.
//!
//! tokio-postgres parses `sslmode` only up to `require`; libpq users also write `verify-ca`,
//! `verify-full` and `sslrootcert=FILE`, so those are taken out of the URL here and turned into a
//! rustls configuration with libpq's meaning: `prefer`/`require` encrypt without checking the
//! certificate (unless `sslrootcert` is given), `verify-ca` checks the chain, `verify-full` also the
//! host name.
//!
//! High availability: a setting may name several hosts (`host=h1,h2 port=p1,p2` or
//! `postgres://u@h1:5432,h2:5433/db`); every connection goes to the one that accepts writes.
//! `target_session_attrs=read-write` is always in force (the daemon writes the outbox on every
//! connection it opens), so tokio-postgres asks each host `SHOW transaction_read_only` in turn
//! and moves on from a standby; a host that still says it is in recovery
//! (`pg_is_in_recovery()`) is refused as well. A connection that stops answering without
//! closing (a frozen server, a dropped route) is noticed by TCP keepalives and the TCP user
//! timeout when the peer's kernel is gone, and by [`ANSWER_TIMEOUT`] on every query when it is
//! not.

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

/// Where Postgres is when nothing says otherwise: the local server, as its superuser.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Dead peers (a host gone, a cable pulled) are noticed after about idle + interval × retries.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged writes fail after this long instead of the kernel's ~15 minutes.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long any query of the daemon may wait for its answer before the connection is given up. A
/// server whose process is frozen (SIGSTOP, a stalled VM behind a live kernel, a proxy that
/// stopped forwarding) still acknowledges TCP, so keepalives and the user timeout never fire: only
/// a deadline on the answer notices it. The daemon's queries take milliseconds (a claim of at
/// most a few hundred rows, a backlog count); ten seconds is far above a loaded server's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The setting does not parse. The message never quotes the input: a string that did not
    /// parse cannot be redacted, and may be mostly password.
    #[error("DATABASE_URL is {message}")]
    InvalidUrl { message: String },
    #[error("cannot read sslrootcert {path}: {message}")]
    RootCert { path: String, message: String },
    #[error("cannot set up TLS for Postgres: {0}")]
    Tls(String),
    #[error("cannot connect to Postgres at {url}: {}", describe(.source))]
    Connect {
        url: String,
        source: tokio_postgres::Error,
    },
    /// Every host answered, none as a primary: a failover in progress, or the wrong hosts.
    #[error(
        "cannot connect to Postgres at {url}: the server is a standby in recovery \
         (pg_is_in_recovery()); the daemon needs the primary"
    )]
    InRecovery { url: String },
    /// The check of a new connection ([`PgTarget::connect`]) failed or got no answer.
    #[error("cannot connect to Postgres at {url}: {source}")]
    Check { url: String, source: QueryError },
}

/// A query that failed, or got no answer in time.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("postgres: {}", describe(.0))]
    Failed(#[from] tokio_postgres::Error),
    /// The connection is to be dropped: whatever it was doing may or may not have happened.
    #[error(
        "postgres did not answer within {} s: the connection is given up",
        ANSWER_TIMEOUT.as_secs()
    )]
    Unanswered,
}

/// Runs one query (or a few) on a connection, waiting at most [`ANSWER_TIMEOUT`] for the answer.
pub async fn answered<T>(
    query: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, QueryError> {
    match tokio::time::timeout(ANSWER_TIMEOUT, query).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(QueryError::Unanswered),
    }
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

/// A parsed `DATABASE_URL`: the tokio-postgres config plus the TLS options it cannot hold.
#[derive(Clone)]
pub struct PgTarget {
    config: Config,
    tls: TlsMode,
    root_cert: Option<String>,
    /// Written from the parsed configuration, never from the input text: see [`PgTarget::parse`].
    redacted: String,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

/// How the setting was written, so that it is shown back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `postgres://user:password@host:port/dbname?param=value`
    Url,
    /// libpq's `host=… port=… user=… password='…' dbname=…`
    KeyValue,
}

/// The parameters tokio-postgres understands, plus `sslrootcert` (taken out here). A key outside
/// this list is reported without its name unless it is a known libpq parameter: in a string that
/// was mistyped (an unquoted password with a space in it), a "key" may be part of the password.
const UNDERSTOOD_PARAMETERS: [&str; 20] = [
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "tcp_user_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "target_session_attrs",
    "channel_binding",
    "load_balance_hosts",
];

/// libpq parameters this program does not support, named in the error when given.
const UNSUPPORTED_LIBPQ_PARAMETERS: [&str; 17] = [
    "service",
    "passfile",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requirepeer",
    "gssencmode",
    "krbsrvname",
    "gsslib",
    "client_encoding",
    "replication",
];

/// The libpq-only TLS options taken out before tokio-postgres sees the rest.
#[derive(Default)]
struct LibpqTls {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
}

impl LibpqTls {
    /// Keeps `sslmode` and `sslrootcert` for itself; says whether the pair goes on to
    /// tokio-postgres.
    fn take(&mut self, key: &str, value: &str) -> bool {
        match key {
            "sslmode" => self.sslmode = Some(value.to_owned()),
            "sslrootcert" => self.sslrootcert = Some(value.to_owned()),
            _ => return true,
        }
        false
    }
}

/// Checks a parameter name without ever putting an unknown one in the message (see
/// [`UNDERSTOOD_PARAMETERS`]); `position` counts parameters from 1.
fn check_parameter(key: &str, position: usize) -> Result<(), String> {
    if UNDERSTOOD_PARAMETERS.contains(&key) {
        Ok(())
    } else if UNSUPPORTED_LIBPQ_PARAMETERS.contains(&key) {
        Err(format!("parameter {key} is not supported"))
    } else {
        Err(format!(
            "parameter number {position} is not a connection parameter (user, password, host, \
             port, dbname, sslmode, sslrootcert, …)"
        ))
    }
}

impl PgTarget {
    /// Parses `DATABASE_URL` in either of libpq's forms: a `postgres://` (or `postgresql://`) URL,
    /// or a key/value string (`host=db user=app password='s3 cr\'et' dbname=reports`, quoting as
    /// libpq does), either naming one host or several. Errors never quote the input and the
    /// redacted form shown in logs is written from the parsed configuration, so no password
    /// reaches any output, however it is written.
    pub fn parse(text: &str) -> Result<PgTarget, ConnectError> {
        let text = text.trim();
        let (form, result) = match url_body(text) {
            Some(body) => (
                Form::Url,
                url_options(body)
                    .map_err(|message| format!("not a valid postgres:// URL: {message}")),
            ),
            None if text.contains("://") => (
                Form::Url,
                Err(
                    "neither a postgres:// URL nor a key/value string: a URL must start with \
                     postgres:// or postgresql://"
                        .to_owned(),
                ),
            ),
            None => (Form::KeyValue, key_value_options(text).map_err(|message| {
                format!("neither a postgres:// URL nor a key/value string (host=… user=… dbname=…): {message}")
            })),
        };
        let (mut config, libpq) = result.map_err(|message| ConnectError::InvalidUrl { message })?;
        let tls = tls_mode(libpq.sslmode.as_deref())?;
        config.ssl_mode(match tls {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Encrypt { required: false } => SslMode::Prefer,
            _ => SslMode::Require,
        });
        // Every connection writes (claims lock and delete outbox rows; install creates the
        // schema): a standby is never the server wanted, whatever the setting asked for.
        config.target_session_attrs(TargetSessionAttrs::ReadWrite);
        config
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let redacted = redacted_form(
            &config,
            form,
            libpq.sslmode.as_deref(),
            libpq.sslrootcert.as_deref(),
        );
        Ok(PgTarget {
            config,
            tls,
            root_cert: libpq.sslrootcert,
            redacted,
        })
    }

    /// The same target, named `name` to the server unless the setting gave an
    /// `application_name` of its own.
    pub fn with_default_application_name(mut self, name: &str) -> PgTarget {
        if self.config.get_application_name().is_none() {
            self.config.application_name(name);
        }
        self
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
            .map_err(|e| ConnectError::Tls(e.to_string()))?;
        let verify = match self.tls {
            TlsMode::VerifyCa | TlsMode::VerifyFull => true,
            TlsMode::Encrypt { .. } => self.root_cert.is_some(),
            TlsMode::Disable => false,
        };
        if !verify {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                    chain: None,
                    provider,
                }))
                .with_no_client_auth());
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            self.root_store()?,
            provider.clone(),
        )
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
            .with_custom_certificate_verifier(Arc::new(LibpqVerifier {
                chain: Some(webpki),
                provider,
            }))
            .with_no_client_auth())
    }

    /// The certificates that may sign the server's: the `sslrootcert` file, read at each
    /// connection (a renewed file is used from the next one), or else the system's trust store.
    fn root_store(&self) -> Result<Arc<rustls::RootCertStore>, ConnectError> {
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
            // Like libpq without sslrootcert: the system's trust store.
            None => return Ok(system_roots()),
        }
        Ok(Arc::new(roots))
    }

    /// Connects to the primary, spawning the driver task. Notifications wake `on_notification`
    /// when given; the returned handle ends when the connection closes, with the error that
    /// closed it.
    pub async fn connect(
        &self,
        on_notification: Option<Arc<Notify>>,
    ) -> Result<(Client, Driver), ConnectError> {
        let connect_error = |source| ConnectError::Connect {
            url: self.redacted.clone(),
            source,
        };
        let (client, driver) = if self.tls == TlsMode::Disable {
            let (client, connection) = self.config.connect(NoTls).await.map_err(connect_error)?;
            (client, drive(connection, on_notification))
        } else {
            let tls = tokio_postgres_rustls::MakeRustlsConnect::new(self.rustls_config()?);
            let (client, connection) = self.config.connect(tls).await.map_err(connect_error)?;
            (client, drive(connection, on_notification))
        };
        self.refuse_standby(&client).await?;
        Ok((client, driver))
    }

    /// `target_session_attrs=read-write` already passed over the hosts that said
    /// `transaction_read_only`; this asks the one chosen whether it is in recovery, for a server
    /// (or a proxy in front of it) that answered that question otherwise.
    async fn refuse_standby(&self, client: &Client) -> Result<(), ConnectError> {
        let in_recovery = answered(client.query_one("SELECT pg_is_in_recovery()", &[]))
            .await
            .and_then(|row| Ok(row.try_get::<_, bool>(0)?))
            .map_err(|source| ConnectError::Check {
                url: self.redacted.clone(),
                source,
            })?;
        match in_recovery {
            true => Err(ConnectError::InRecovery {
                url: self.redacted.clone(),
            }),
            false => Ok(()),
        }
    }
}

/// libpq's `sslmode`, as a [`TlsMode`].
fn tls_mode(sslmode: Option<&str>) -> Result<TlsMode, ConnectError> {
    Ok(match sslmode {
        None | Some("prefer") | Some("allow") => TlsMode::Encrypt { required: false },
        Some("disable") => TlsMode::Disable,
        Some("require") => TlsMode::Encrypt { required: true },
        Some("verify-ca") => TlsMode::VerifyCa,
        Some("verify-full") => TlsMode::VerifyFull,
        Some(_) => {
            return Err(ConnectError::InvalidUrl {
                message: "invalid: sslmode must be disable, prefer, require, verify-ca or \
                          verify-full"
                    .to_owned(),
            })
        }
    })
}

/// What follows `postgres://` or `postgresql://` (in any case), if the text is such a URL.
fn url_body(text: &str) -> Option<&str> {
    let (scheme, body) = text.split_once("://")?;
    ["postgres", "postgresql"]
        .iter()
        .any(|known| scheme.eq_ignore_ascii_case(known))
        .then_some(body)
}

/// A `postgres://` URL as libpq writes it, with one host or several
/// (`user@h1:5432,h2:5433/db?target_session_attrs=read-write`): libpq's TLS options taken out of
/// the query, the rest parsed by tokio-postgres (a general URL parser refuses the host list).
fn url_options(body: &str) -> Result<(Config, LibpqTls), String> {
    // A '/', '?', '#' or '@' left raw in a password ends the authority early or makes the '@'
    // ambiguous; what follows would be read as path, query or host, and a part of the password
    // shown as a database name or host. Messages never quote the input.
    let spilled = || {
        "an '@' or '#' out of place: a password's '/', '?', '#' and '@' must be \
         percent-encoded (%2F, %3F, %23, %40)"
            .to_owned()
    };
    if body.contains('#') {
        return Err(spilled());
    }
    let authority_end = body.find(['/', '?']).unwrap_or(body.len());
    let (authority, rest) = body.split_at(authority_end);
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if authority.matches('@').count() > 1 || path.contains('@') {
        return Err(spilled());
    }
    let mut libpq = LibpqTls::default();
    let mut kept = Vec::new();
    for (position, pair) in query.split('&').filter(|pair| !pair.is_empty()).enumerate() {
        let Some((key, value)) = url::form_urlencoded::parse(pair.as_bytes()).next() else {
            continue;
        };
        check_parameter(&key, position + 1)?;
        if key != "password" && value.contains('@') {
            return Err(spilled());
        }
        if libpq.take(&key, &value) {
            // tokio-postgres ends the credentials at the first '@' of the whole URL: one in a
            // password given as a parameter must not be that '@'.
            kept.push(pair.replace('@', "%40"));
        }
    }
    let mut url = format!("postgres://{authority}{path}");
    if !kept.is_empty() {
        url.push('?');
        url.push_str(&kept.join("&"));
    }
    // Every key was checked above, so tokio-postgres' messages name only known parameters
    // ("invalid value for option `port`"), never a value.
    let config = url.parse::<Config>().map_err(|error| describe(&error))?;
    Ok((config, libpq))
}

/// A libpq key/value string, read with libpq's rules (`key = value`, values in single quotes when
/// they hold spaces, `\'` and `\\` escapes); libpq's TLS options taken out, the rest handed to
/// tokio-postgres re-quoted. Errors give byte positions, never text.
fn key_value_options(text: &str) -> Result<(Config, LibpqTls), String> {
    let pairs = split_key_values(text)?;
    if pairs.is_empty() {
        return Err("it is empty".to_owned());
    }
    let mut libpq = LibpqTls::default();
    let mut kept = String::new();
    for (position, (key, value)) in pairs.iter().enumerate() {
        check_parameter(key, position + 1)?;
        if libpq.take(key, value) {
            let quoted = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push_str(&format!("{key}='{quoted}' "));
        }
    }
    let config = kept.parse::<Config>().map_err(|error| describe(&error))?;
    Ok((config, libpq))
}

/// Splits `key = value` pairs as libpq does.
fn split_key_values(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut chars = text.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(key_start, _)) = chars.peek() else {
            return Ok(pairs);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            return Err(format!(
                "the parameter starting at byte {key_start} has no '=' (a value with spaces \
                 goes in single quotes)"
            ));
        }
        if key.is_empty() {
            return Err(format!(
                "an '=' without a parameter name at byte {key_start}"
            ));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        loop {
            match chars.next() {
                None if quoted => {
                    return Err(format!(
                        "the quoted value of the parameter starting at byte {key_start} has no \
                         closing quote"
                    ))
                }
                None => break,
                Some((_, '\'')) if quoted => break,
                Some((_, c)) if !quoted && c.is_whitespace() => break,
                Some((_, '\\')) => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(escaped);
                    }
                }
                Some((_, c)) => value.push(c),
            }
        }
        if value.is_empty() && !quoted {
            return Err(format!(
                "the parameter starting at byte {key_start} has no value (write '' for an empty one)"
            ));
        }
        pairs.push((key, value));
    }
}

/// The target as an operator may see it: written from the parsed configuration in the form the
/// setting used, the password (if any) as `***`.
fn redacted_form(
    config: &Config,
    form: Form,
    sslmode: Option<&str>,
    sslrootcert: Option<&str>,
) -> String {
    let mut options: Vec<(&str, &str)> = Vec::new();
    if let Some(mode) = sslmode {
        options.push(("sslmode", mode));
    }
    if let Some(path) = sslrootcert {
        options.push(("sslrootcert", path));
    }
    match form {
        Form::Url => redacted_url(config, &options),
        Form::KeyValue => redacted_key_value(config, &options),
    }
}

/// Each host (or, without host names, each `hostaddr`) with its port when one was given.
fn hosts_and_ports(config: &Config) -> Vec<(String, Option<u16>)> {
    let ports = config.get_ports();
    let port_of = |index: usize| match ports.len() {
        0 => None,
        1 => Some(ports[0]),
        _ => ports.get(index).copied(),
    };
    let names: Vec<String> = if config.get_hosts().is_empty() {
        config
            .get_hostaddrs()
            .iter()
            .map(ToString::to_string)
            .collect()
    } else {
        config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect()
    };
    names
        .into_iter()
        .enumerate()
        .map(|(index, name)| (name, port_of(index)))
        .collect()
}

/// Readable where it can be (`sslrootcert=/etc/ssl/ca.pem`), percent-encoded where a character
/// would change how the URL reads.
fn url_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn redacted_url(config: &Config, options: &[(&str, &str)]) -> String {
    let mut out = String::from("postgres://");
    let password = config.get_password().is_some();
    if let Some(user) = config.get_user() {
        out.push_str(&url_encode(user));
    }
    if password {
        out.push_str(":***");
    }
    if config.get_user().is_some() || password {
        out.push('@');
    }
    let hosts: Vec<String> = hosts_and_ports(config)
        .into_iter()
        .map(|(name, port)| {
            let name = if name.contains(':') && !name.starts_with('[') {
                format!("[{name}]")
            } else if name.starts_with('/') {
                url_encode(&name).replace('/', "%2F")
            } else {
                name
            };
            match port {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    out.push_str(&hosts.join(","));
    if let Some(dbname) = config.get_dbname() {
        out.push('/');
        out.push_str(&url_encode(dbname));
    }
    if !options.is_empty() {
        let query: Vec<String> = options
            .iter()
            .map(|(key, value)| format!("{key}={}", url_encode(value)))
            .collect();
        out.push('?');
        out.push_str(&query.join("&"));
    }
    out
}

fn redacted_key_value(config: &Config, options: &[(&str, &str)]) -> String {
    let quote = |text: &str| {
        if !text.is_empty() && !text.contains(|c: char| c.is_whitespace() || c == '\'' || c == '\\')
        {
            text.to_owned()
        } else {
            format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
        }
    };
    let mut parts = Vec::new();
    let hosts = hosts_and_ports(config);
    if !hosts.is_empty() {
        let names: Vec<&str> = hosts.iter().map(|(name, _)| name.as_str()).collect();
        parts.push(format!("host={}", quote(&names.join(","))));
    }
    let ports = config.get_ports();
    if !ports.is_empty() {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        parts.push(format!("port={}", ports.join(",")));
    }
    if let Some(user) = config.get_user() {
        parts.push(format!("user={}", quote(user)));
    }
    if config.get_password().is_some() {
        parts.push("password=***".to_owned());
    }
    if let Some(dbname) = config.get_dbname() {
        parts.push(format!("dbname={}", quote(dbname)));
    }
    for (key, value) in options {
        parts.push(format!("{key}={}", quote(value)));
    }
    parts.join(" ")
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

/// The certificate checks libpq's modes ask for short of `verify-full`: `prefer`/`require`
/// without a root certificate encrypt and trust any certificate (`chain: None`); `verify-ca`
/// checks that the chain leads to the root certificate, but not the host name. Signatures are
/// checked either way, with the provider's algorithms.
#[derive(Debug)]
struct LibpqVerifier {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for LibpqVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
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
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The system's trust store, read once per process: it is a few hundred files, and reading and
/// parsing them at every connection held the daemon's one thread for as long each time (a CA
/// added to the system later is trusted after a restart).
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            Arc::new(roots)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of a connection string that must not parse.
    fn parse_error(url: &str) -> String {
        match PgTarget::parse(url) {
            Ok(target) => panic!("{} parsed", target.redacted()),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn libpq_ssl_options_are_understood_and_errors_are_redacted() {
        let url = "postgres://u:pw@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem";
        let target = PgTarget::parse(url).expect("parses");
        assert_eq!(target.tls, TlsMode::VerifyFull);
        assert_eq!(target.root_cert.as_deref(), Some("/ca.pem"));
        assert_eq!(
            target.redacted(),
            "postgres://u:***@db:5432/x?sslmode=verify-full&sslrootcert=/ca.pem"
        );
        let bad = "postgres://u:pw@db/x?sslmode=sometimes";
        let message = parse_error(bad);
        assert!(message.contains("sslmode must be"), "{message}");
        assert!(!message.contains("pw"), "{message}");
    }

    #[test]
    fn key_value_strings_parse_with_libpq_quoting() {
        let text =
            r"host=db port = 5433 user=app password='s3 cr\'et\\' dbname=reports sslmode=verify-ca";
        let target = PgTarget::parse(text).expect("parses");
        assert_eq!(target.config.get_password(), Some(&b"s3 cr'et\\"[..]));
        assert_eq!(target.config.get_ports(), &[5433]);
        assert_eq!(target.tls, TlsMode::VerifyCa);
        assert_eq!(
            target.redacted(),
            "host=db port=5433 user=app password=*** dbname=reports sslmode=verify-ca"
        );
        let unquoted = "host=db password=Se cret9=x";
        let message = parse_error(unquoted);
        assert!(message.starts_with("DATABASE_URL is neither"), "{message}");
        assert!(!message.contains("cret9"), "{message}");
        let open = "host=db password='Secret9";
        let message = parse_error(open);
        assert!(
            message.contains("no closing quote") && !message.contains("Secret9"),
            "{message}"
        );
    }

    #[test]
    fn urls_with_raw_special_characters_in_the_password_are_refused_unquoted() {
        for text in [
            "postgres://u:12/Secret9@db/x",
            "postgres://u:12?k=Secret9@db/x",
            "postgres://u:pa#Secret9@db/x",
            "postgres://u:pa@Secret9@db/x",
        ] {
            match PgTarget::parse(text) {
                Ok(target) => assert!(!target.redacted().contains("Secret9"), "{text}: {target:?}"),
                Err(error) => assert!(!error.to_string().contains("Secret9"), "{text}: {error}"),
            }
        }
        let encoded = "postgres://u:a%2Fb%3Fc%40d%23Secret9@db:5432/x";
        let target = PgTarget::parse(encoded).expect("parses");
        assert_eq!(target.config.get_password(), Some(&b"a/b?c@d#Secret9"[..]));
        assert_eq!(target.redacted(), "postgres://u:***@db:5432/x");
    }

    #[test]
    fn several_hosts_parse_in_either_form_and_always_ask_for_a_primary() {
        let url = "postgres://app:Secret9@h1:5432,h2:5433/reports?target_session_attrs=read-write";
        let target = PgTarget::parse(url).expect("parses");
        assert_eq!(target.config.get_ports(), &[5432, 5433]);
        assert_eq!(
            target.redacted(),
            "postgres://app:***@h1:5432,h2:5433/reports"
        );
        let key_value = "host=h1,h2 port=5432,5433 user=app password=Secret9 dbname=reports";
        let target = PgTarget::parse(key_value).expect("parses");
        assert_eq!(
            target.redacted(),
            "host=h1,h2 port=5432,5433 user=app password=*** dbname=reports"
        );
        // Whatever was asked, every connection goes to a server that accepts writes.
        for text in [url, key_value, "postgres://h1/x?target_session_attrs=any"] {
            let target = PgTarget::parse(text).expect("parses");
            assert_eq!(
                target.config.get_target_session_attrs(),
                TargetSessionAttrs::ReadWrite
            );
        }
        let message = parse_error("postgres://u:Secret9@h1:5432,h2:x/db");
        assert!(
            message.contains("port") && !message.contains("Secret9"),
            "{message}"
        );
        let target =
            PgTarget::parse("POSTGRESQL://[::1]:5432,h2/db?sslmode=disable").expect("parses");
        assert_eq!(
            target.redacted(),
            "postgres://[::1]:5432,h2:5432/db?sslmode=disable"
        );
    }
}
