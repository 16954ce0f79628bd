//! Redis behind Sentinel (`redis+sentinel://`, `rediss+sentinel://`): which server is the master
//! of a service now, and word of a failover as soon as the sentinels announce it.
//!
//! The URL lists the sentinels and names the service:
//! `redis+sentinel://[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB][?sentinel_username=…&sentinel_password=…]`.
//! `USER:PASSWORD` and `DB` are the master's (what the cache is read and written with); the
//! sentinels' own credentials, when they have any, are the query parameters, since a sentinel
//! usually has a password of its own or none. `rediss+sentinel://` speaks TLS to the sentinels and
//! to the master alike.
//!
//! The lookup asks the sentinels in the order listed and takes the first answer; the caller then
//! checks with `ROLE` that the server named really is a master (a sentinel that has not seen the
//! failover yet names the old one). The redis crate's `SentinelClient` does the same lookup, but
//! without a connect or response timeout (a sentinel that stops answering would hang the worker)
//! and without the CA file for TLS, so the few commands are sent here, on connections with the
//! daemon's timeouts.
//!
//! The sentinels publish `+switch-master <service> <old ip> <old port> <new ip> <new port>` when
//! they promote a replica. [`Switches`] hears it from every sentinel (one subscription each, so a
//! sentinel that is down or frozen does not deafen the worker) and lets the worker drop a
//! connection to a master that was replaced while still answering (a partition), and retry at
//! once instead of waiting out a backoff.

use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;
use redis::{AsyncConnectionConfig, Client, ConnectionInfo, IntoConnectionInfo};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long a sentinel may take to accept a connection or answer one command: a lookup asks the
/// next sentinel after it, so this bounds how long one dead sentinel delays a reconnect.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before subscribing again to a sentinel whose subscription failed or ended: short, since
/// the announcement of a failover is what it is for.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);
/// The channel the sentinels announce a promotion on.
const SWITCH_CHANNEL: &str = "+switch-master";
/// The channels a sentinel announces an instance down (subjectively) and back on.
const DOWN_CHANNEL: &str = "+sdown";
const UP_CHANNEL: &str = "-sdown";

/// The sentinels of one service, parsed from the URL.
pub struct Sentinels {
    /// One client per sentinel, in the URL's order, with the sentinels' own credentials.
    sentinels: Vec<Client>,
    /// The service (master name) the sentinels watch.
    pub service: String,
    /// Credentials, database, protocol and TLS for the master; its address is the sentinels'.
    master: ConnectionInfo,
    /// The switch announcements, started with the first worker that asks for them.
    announcements: OnceLock<(watch::Sender<Announced>, DropGuard)>,
}

/// What the sentinels announced that makes the worker connect again: a new master, or a replica
/// down (the worker then counts the replicas to wait for again, see [`crate::replicas`]).
#[derive(Debug, Default)]
pub struct Announced {
    master: Option<(String, u16)>,
    /// Replicas of the service some sentinel calls down now, by name.
    replicas_down: std::collections::BTreeSet<String>,
    /// The last announcement that counted, for the log.
    what: String,
}

/// One announcement of a sentinel about the service.
#[derive(Debug, PartialEq, Eq)]
enum Event {
    Switched(String, u16),
    ReplicaDown(String),
    ReplicaUp(String),
}

impl std::fmt::Display for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Switched(host, port) => {
                write!(f, "the sentinels switched the master to {host}:{port}")
            }
            Event::ReplicaDown(name) => write!(f, "a sentinel called replica {name} down"),
            Event::ReplicaUp(name) => write!(f, "a sentinel called replica {name} up again"),
        }
    }
}

impl Announced {
    /// Books `event`; true when the worker must connect again.
    fn book(&mut self, event: Event) -> bool {
        let what = event.to_string();
        let counts = match event {
            Event::Switched(host, port) => {
                let master = Some((host, port));
                let new = self.master != master;
                self.master = master;
                new
            }
            Event::ReplicaDown(name) => self.replicas_down.insert(name),
            Event::ReplicaUp(name) => {
                self.replicas_down.remove(&name);
                false
            }
        };
        if counts {
            self.what = what;
        }
        counts
    }
}

/// What the sentinels announced, as the worker last saw it.
pub struct Switches(watch::Receiver<Announced>);

impl Switches {
    /// Takes what was announced so far as seen: call it before asking the sentinels.
    pub fn mark_seen(&mut self) {
        self.0.borrow_and_update();
    }

    /// A new master or a replica down was announced since [`Switches::mark_seen`].
    pub fn switched(&self) -> bool {
        self.0.has_changed().unwrap_or(false)
    }

    /// The last announcement, for the log.
    pub fn announced(&self) -> String {
        self.0.borrow().what.clone()
    }

    /// Returns once there is an announcement not seen yet (at once if there is one already),
    /// leaving it unseen for [`Switches::switched`]; never when the announcements stopped.
    pub async fn announcement(&self) {
        if self.0.clone().changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Sentinels {
    /// Parses what follows `redis+sentinel://` (`plain_scheme`: `redis` or `rediss`). `Err` says
    /// which part is wrong, without the passwords.
    pub fn parse(
        plain_scheme: &str,
        rest: &str,
        open: impl Fn(ConnectionInfo) -> redis::RedisResult<Client>,
    ) -> Result<Sentinels, String> {
        let parts = SentinelUrl::split(rest)?;
        let userinfo = |user: Option<&str>, password: Option<&str>| match (user, password) {
            (None, None) => String::new(),
            (user, Some(password)) => format!("{}:{password}@", user.unwrap_or("")),
            (Some(user), None) => format!("{user}@"),
        };
        let sentinel_auth = userinfo(parts.sentinel_user, parts.sentinel_password);
        let sentinels = parts
            .hosts
            .iter()
            .map(|host| {
                let info = format!("{plain_scheme}://{sentinel_auth}{host}/0")
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| format!("sentinel {host}: {e}"))?;
                open(info).map_err(|e| format!("sentinel {host}: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // The master's settings, read by the redis crate from a URL with the first sentinel's
        // address (percent-decoding the credentials as for any Redis URL); the address is replaced
        // by the one the sentinels name.
        let master_auth = parts.userinfo.map(|u| format!("{u}@")).unwrap_or_default();
        let master = format!(
            "{plain_scheme}://{master_auth}{}/{}",
            parts.hosts[0], parts.db
        )
        .as_str()
        .into_connection_info()
        .map_err(|e| format!("the master's user, password or database: {e}"))?;
        Ok(Sentinels {
            sentinels,
            service: parts.service.to_owned(),
            master,
            announcements: OnceLock::new(),
        })
    }

    /// The master's connection info at `host:port`, as the sentinels name it.
    pub fn master_at(&self, host: String, port: u16) -> ConnectionInfo {
        super::at_address(&self.master, host, port)
    }

    /// The master's address from the first sentinel that answers. `Err` lists what each said.
    pub async fn master_address(&self) -> Result<(String, u16), String> {
        let mut failures = Vec::with_capacity(self.sentinels.len());
        for sentinel in &self.sentinels {
            let name = super::node_name(sentinel.get_connection_info().addr());
            match self.ask(sentinel).await {
                Ok(Some(address)) => return Ok(address),
                Ok(None) => {
                    failures.push(format!("{name} does not know service {:?}", self.service))
                }
                Err(error) => failures.push(format!("{name}: {error}")),
            }
        }
        Err(failures.join("; "))
    }

    async fn ask(&self, sentinel: &Client) -> redis::RedisResult<Option<(String, u16)>> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(SENTINEL_TIMEOUT))
            .set_response_timeout(Some(SENTINEL_TIMEOUT));
        let mut connection = sentinel
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.service)
            .query_async(&mut connection)
            .await
    }

    /// The announcements of new masters for this service, as seen from now on. The first call
    /// subscribes to every sentinel (tasks of the tokio runtime it is called in); the
    /// subscriptions end with the last clone of the target.
    pub fn switches(&self) -> Switches {
        let (sender, _) = self.announcements.get_or_init(|| {
            let (sender, _) = watch::channel(Announced::default());
            let stop = CancellationToken::new();
            for sentinel in &self.sentinels {
                tokio::spawn(listen_for_switches(
                    sentinel.clone(),
                    self.service.clone(),
                    sender.clone(),
                    stop.clone(),
                ));
            }
            (sender, stop.drop_guard())
        });
        Switches(sender.subscribe())
    }
}

/// Subscribes to one sentinel's announcements for as long as `stop` is not cancelled, again
/// after each failure.
async fn listen_for_switches(
    sentinel: Client,
    service: String,
    announced: watch::Sender<Announced>,
    stop: CancellationToken,
) {
    let name = super::node_name(sentinel.get_connection_info().addr());
    loop {
        let listened = async {
            let mut pubsub = tokio::time::timeout(SENTINEL_TIMEOUT, sentinel.get_async_pubsub())
                .await
                .map_err(|_| format!("no connection within {SENTINEL_TIMEOUT:?}"))?
                .map_err(|e| e.to_string())?;
            pubsub
                .subscribe(&[SWITCH_CHANNEL, DOWN_CHANNEL, UP_CHANNEL])
                .await
                .map_err(|e| e.to_string())?;
            let mut messages = pubsub.on_message();
            while let Some(message) = messages.next().await {
                let Ok(payload) = message.get_payload::<String>() else {
                    continue;
                };
                let Some(event) = event(message.get_channel_name(), &payload, &service) else {
                    continue;
                };
                tracing::info!(sentinel = %name, %service, "{event}");
                announced.send_if_modified(|current| current.book(event));
            }
            Err::<(), String>("the subscription ended".to_owned())
        };
        tokio::select! {
            result = listened => {
                if let Err(error) = result {
                    tracing::debug!(sentinel = %name, %error, "listening for master switches failed; subscribing again");
                }
            }
            _ = stop.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(RESUBSCRIBE_DELAY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The announcement about `service` in a message: `+switch-master <service> <old ip> <old port>
/// <new ip> <new port>`, or `±sdown slave <name> <ip> <port> @ <service> <ip> <port>`. `None`
/// for another service or instance.
fn event(channel: &str, payload: &str, service: &str) -> Option<Event> {
    let fields: Vec<&str> = payload.split_whitespace().collect();
    match (channel, &fields[..]) {
        (SWITCH_CHANNEL, [name, _, _, host, port]) if *name == service => {
            Some(Event::Switched((*host).to_owned(), port.parse().ok()?))
        }
        (DOWN_CHANNEL, ["slave", replica, _, _, "@", name, ..]) if *name == service => {
            Some(Event::ReplicaDown((*replica).to_owned()))
        }
        (UP_CHANNEL, ["slave", replica, _, _, "@", name, ..]) if *name == service => {
            Some(Event::ReplicaUp((*replica).to_owned()))
        }
        _ => None,
    }
}

/// The parts of a Sentinel URL after the scheme, still percent-encoded.
#[derive(Debug, PartialEq, Eq)]
pub struct SentinelUrl<'a> {
    /// `USER:PASSWORD` for the master.
    pub userinfo: Option<&'a str>,
    pub hosts: Vec<&'a str>,
    pub service: &'a str,
    pub db: i64,
    pub sentinel_user: Option<&'a str>,
    pub sentinel_password: Option<&'a str>,
}

impl<'a> SentinelUrl<'a> {
    /// Splits `[USER:PASSWORD@]HOST:PORT[,HOST:PORT…]/SERVICE[/DB][?sentinel_username=…&sentinel_password=…]`.
    /// Characters of a password that are special in a URL (`@ / ? # & %`) must be
    /// percent-encoded, as in any URL. Errors name a part by its place, never by its text: in a
    /// mistyped URL (a raw `?` in a password) any part may hold a piece of a password.
    pub fn split(rest: &'a str) -> Result<SentinelUrl<'a>, String> {
        let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (userinfo, after_userinfo) = match before_query.rfind('@') {
            Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
            None => (None, before_query),
        };
        let (hosts, path) = after_userinfo
            .split_once('/')
            .unwrap_or((after_userinfo, ""));
        let hosts: Vec<&str> = hosts.split(',').collect();
        if hosts.iter().any(|host| host.is_empty()) {
            return Err(
                "no sentinel host:port before the service name (or an empty one in the list)"
                    .into(),
            );
        }
        if let Some(place) = hosts.iter().position(|host| !has_port(host)) {
            return Err(format!(
                "sentinel address {} of {} is not host:port (sentinels usually listen on 26379)",
                place + 1,
                hosts.len()
            ));
        }
        let mut segments = path.split('/');
        let service = segments.next().unwrap_or("");
        if service.is_empty() {
            return Err(
                "no service name: the path must be /SERVICE_NAME or /SERVICE_NAME/DB".into(),
            );
        }
        let db = match segments.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse()
                .map_err(|_| "the database after the service name is not a number".to_owned())?,
        };
        if segments.next().is_some() {
            return Err("too many path parts: the path is /SERVICE_NAME[/DB]".into());
        }
        let mut url = SentinelUrl {
            userinfo,
            hosts,
            service,
            db,
            sentinel_user: None,
            sentinel_password: None,
        };
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            match pair.split_once('=') {
                Some(("sentinel_password", value)) => url.sentinel_password = Some(value),
                Some(("sentinel_username", value)) => url.sentinel_user = Some(value),
                _ => {
                    return Err(
                        "a query parameter other than sentinel_username and sentinel_password"
                            .to_owned(),
                    );
                }
            }
        }
        Ok(url)
    }
}

/// `host:port` or `[v6]:port` with a numeric port.
fn has_port(host: &str) -> bool {
    host.rsplit_once(':')
        .is_some_and(|(name, port)| !name.is_empty() && port.parse::<u16>().is_ok())
}

/// The server's own word on its role (`master`, `slave`, `sentinel`): the first field of `ROLE`.
pub async fn role(
    connection: &mut redis::aio::MultiplexedConnection,
) -> redis::RedisResult<String> {
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(connection).await?;
    Ok(match role.first() {
        Some(redis::Value::BulkString(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        Some(redis::Value::SimpleString(text)) => text.clone(),
        _ => "(no role)".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_hosts_service_database_and_both_credentials() {
        let url = SentinelUrl::split(
            "app:pw%40x@10.0.0.1:26379,[::1]:26380/mymaster/3?sentinel_password=s3&sentinel_username=sen",
        )
        .expect("parses");
        assert_eq!(
            url,
            SentinelUrl {
                userinfo: Some("app:pw%40x"),
                hosts: vec!["10.0.0.1:26379", "[::1]:26380"],
                service: "mymaster",
                db: 3,
                sentinel_user: Some("sen"),
                sentinel_password: Some("s3"),
            }
        );
        let plain = SentinelUrl::split("h:26379/cache").expect("parses");
        assert_eq!(
            (plain.service, plain.db, plain.userinfo),
            ("cache", 0, None)
        );
    }

    #[test]
    fn a_bad_sentinel_url_names_the_part() {
        let error = |rest: &str| SentinelUrl::split(rest).expect_err(rest);
        assert!(error("h:26379").contains("no service name"));
        assert!(error("h:26379/").contains("no service name"));
        assert!(error("h:1,h/mymaster").contains("address 2 of 2 is not host:port"));
        assert!(error("h:1,,h:2/m").contains("empty one"));
        assert!(error("h:1/m/zero").contains("not a number"));
        assert!(error("h:1/m/0/x").contains("too many"));
        let unknown = error("h:1/m?password=secret");
        assert!(
            unknown.contains("query parameter") && !unknown.contains("secret"),
            "{unknown}"
        );
        // A raw `?` in a password: what follows it is no part to show, nor what precedes it.
        let mistyped = error("bob:pa?SECRET@h:1/m");
        assert!(
            !mistyped.contains("pa") && !mistyped.contains("SECRET"),
            "{mistyped}"
        );
    }

    #[test]
    fn only_announcements_about_our_service_count_once() {
        let switch = |payload: &str| event(SWITCH_CHANNEL, payload, "mymaster");
        let to_6380 = "mymaster 127.0.0.1 6379 127.0.0.1 6380";
        assert_eq!(
            switch(to_6380),
            Some(Event::Switched("127.0.0.1".to_owned(), 6380))
        );
        assert_eq!(switch("other 1 2 3 4"), None);
        assert_eq!(switch("mymaster 1 2"), None);
        let down = "slave 127.0.0.1:6381 127.0.0.1 6381 @ mymaster 127.0.0.1 6380";
        assert_eq!(
            event(DOWN_CHANNEL, down, "mymaster"),
            Some(Event::ReplicaDown("127.0.0.1:6381".to_owned()))
        );
        assert_eq!(event(DOWN_CHANNEL, down, "other"), None);
        assert_eq!(
            event(DOWN_CHANNEL, "master mymaster 127.0.0.1 6380", "mymaster"),
            None
        );
        // Each of three sentinels announces the same switch or the same replica: once counts.
        let mut announced = Announced::default();
        assert!(announced.book(switch(to_6380).expect("switch")));
        assert!(!announced.book(switch(to_6380).expect("switch")));
        let replica = || Event::ReplicaDown("127.0.0.1:6381".to_owned());
        assert!(announced.book(replica()));
        assert!(!announced.book(replica()));
        assert!(!announced.book(Event::ReplicaUp("127.0.0.1:6381".to_owned())));
        assert!(announced.book(replica()));
    }
}
