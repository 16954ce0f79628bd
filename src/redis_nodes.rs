//! Connecting to the Redis that holds the cache: one server (`redis://`, `rediss://`, or a Unix
//! socket: `unix:///path`, `redis+unix:///path`) or every primary of a Redis Cluster
//! (`redis+cluster://host:port,host:port`, `rediss+cluster://…`), or the master of a service
//! watched by Redis Sentinel (`redis+sentinel://host:port,…/service`, [`sentinel`]): asked of the
//! sentinels at each connection, so a reconnect after a failover finds the new master.
//!
//! A sweep must see every key, and `SCAN` walks one node's keyspace, so in a cluster the worker
//! keeps one plain connection per primary (discovered with `CLUSTER NODES`, rediscovered after any
//! failure) rather than the cluster client, which routes by key and cannot scan.
//!
//! A sweep of a cluster is only complete if the primaries it scanned served every slot for the
//! whole sweep. Discovery therefore refuses a topology that leaves slots without a reachable primary
//! (a failover in progress) and records what each primary said about itself; the sweep compares
//! that with the node's own `CLUSTER NODES` line before it reports windows finished
//! ([`Node::verify_shard`]): a failover, a slot migration or a demotion in between makes the batch
//! run again instead of being acknowledged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo};

use crate::replicas::{connected_replicas, ReplicaPolicy};

mod sentinel;
pub use sentinel::Switches;
use sentinel::{SentinelUrl, Sentinels};

/// `REDIS_URL` when none is given: the usual local server.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/0";
/// What a Redis URL that does not parse is shown as: it cannot be redacted, so it is not shown.
const NOT_SHOWN: &str = "<not shown: it does not parse>";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Hash slots of a Redis Cluster: a topology is usable only when its primaries serve all of them.
const CLUSTER_SLOTS: usize = 16384;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("redis URL {url} is not valid: {message}")]
    InvalidUrl { url: String, message: String },
    #[error("cannot read the Redis CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("redis at {node}: {source}")]
    Redis {
        node: String,
        source: redis::RedisError,
    },
    #[error("redis cluster: {0}")]
    Topology(String),
    /// No sentinel answered, or none named a master that says it is one (a failover settling).
    #[error("redis sentinel: {0}")]
    Sentinel(String),
    #[error(
        "redis at {node} is a Redis Cluster node: a sweep of it alone would miss the keys of the \
         other primaries; use redis+cluster://{node} (or rediss+cluster://)"
    )]
    ClusterNode { node: String },
}

impl NodeError {
    /// Configuration errors will not heal by retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            NodeError::InvalidUrl { .. } | NodeError::CaFile { .. } | NodeError::ClusterNode { .. }
        )
    }
}

/// One server holding part (or all) of the keyspace, with the connection the sweep uses.
#[derive(Clone)]
pub struct Node {
    /// `host:port`, for logs.
    pub name: String,
    pub connection: MultiplexedConnection,
    /// Cluster nodes refuse multi-key commands across hash slots: UNLINK is grouped by slot.
    pub clustered: bool,
    /// In a cluster, what this primary said about itself when the worker connected.
    pub shard: Option<ShardView>,
    /// How this server's `SCAN` cursors order the keyspace (read from `INFO` when connecting).
    pub cursor_order: CursorOrder,
    /// The same server with RESP3, for index mode's tracking connection (push messages).
    pub tracking_client: Client,
    /// Replicas connected to this node (`INFO replication`), as last read: when connecting, then
    /// with each confirmation of its deletes. `None` where `INFO` is refused.
    pub replicas: Option<u32>,
    /// Which replicas must have this node's deletes before a change is acknowledged.
    pub replica_policy: ReplicaPolicy,
}

/// What a `SCAN` cursor says about how far a pass has got, which depends on the server.
///
/// A window that joins a pass midway is done once the pass has gone round to where it joined, so
/// the sweep must compare cursors by how far into a pass they are. Getting that wrong would report
/// keys gone that were never looked at, so where the order is not known a window waits for a whole
/// pass of its own instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorOrder {
    /// One hash table: the cursor is a bucket index in reverse bit order (the known Redis and
    /// Valkey releases outside cluster mode, and cluster mode before Redis 7.4 and Valkey 8).
    ReversedBuckets,
    /// Cluster mode from Redis 7.4 and Valkey 8 on: one table per hash slot, the slot in the low
    /// 14 bits and the reversed-order bucket cursor above them (`kvstoreScan`). A pass walks the
    /// slots in ascending order.
    SlotThenReversedBuckets,
    /// Not known for certain (a release whose `SCAN` was not read, another server such as
    /// Dragonfly, a proxy, an unreadable `INFO`): no position is trusted, and the node is swept in
    /// one lane from cursor 0.
    Unknown,
}

/// Bits of a cursor that hold the hash slot in [`CursorOrder::SlotThenReversedBuckets`].
const SLOT_BITS: u32 = 14;

impl CursorOrder {
    /// How far into a pass `cursor` is: grows during a pass, even across a rehash. `None` when
    /// the order is unknown.
    pub fn position(self, cursor: u64) -> Option<u64> {
        match self {
            CursorOrder::ReversedBuckets => Some(cursor.reverse_bits()),
            CursorOrder::SlotThenReversedBuckets => {
                let slot = cursor & ((1 << SLOT_BITS) - 1);
                let buckets = cursor >> SLOT_BITS;
                Some((slot << (64 - SLOT_BITS)) | (buckets.reverse_bits() >> SLOT_BITS))
            }
            CursorOrder::Unknown => None,
        }
    }

    /// Reads the order from the replies to `INFO server` and `INFO cluster`.
    pub fn from_info(server: &str, cluster: &str) -> CursorOrder {
        CursorOrder::read(server, cluster).unwrap_or(CursorOrder::Unknown)
    }

    /// The order, or why it is not known for certain (for the warning).
    ///
    /// Only servers whose `SCAN` code was read are trusted: a newer release may change the cursor
    /// (as Redis 7.4 did in cluster mode), and a proxy or another server answering like Redis may
    /// stand for several tables. Positions from a wrong order would end a window that joined
    /// mid-pass early: a missed key. So a server is known when it names itself as Redis or Valkey
    /// in a release range below, with no other server's version field, and says the same about its
    /// mode in `INFO server` as in `INFO cluster`; anything else gets one lane from cursor 0.
    pub fn read(server: &str, cluster: &str) -> Result<CursorOrder, String> {
        // Major and minor of a `x.y.z` version.
        let version = |text: &str| -> Option<(u32, u32)> {
            let mut parts = text.split('.');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        };
        if let Some(foreign) = server.lines().find_map(|line| {
            let name = line.split(':').next()?.strip_suffix("_version")?;
            (!OWN_VERSION_FIELDS.contains(&name)).then_some(name)
        }) {
            return Err(format!(
                "the server reports {foreign}_version: not Redis or Valkey"
            ));
        }
        let clustered = match info_field(cluster, "cluster_enabled") {
            Some("0") => false,
            Some("1") => true,
            _ => return Err("INFO cluster has no cluster_enabled".to_owned()),
        };
        // Valkey writes `server_mode` (or `redis_mode` when asked to look like Redis).
        let mode = info_field(server, "redis_mode").or_else(|| info_field(server, "server_mode"));
        match (mode, clustered) {
            (Some("standalone"), false) | (Some("cluster"), true) => {}
            (mode, _) => {
                return Err(format!(
                    "INFO says mode {} with cluster_enabled:{}: a proxy?",
                    mode.unwrap_or("(none)"),
                    u8::from(clustered)
                ))
            }
        }
        // Valkey also reports `redis_version:7.2.4`, for clients that check it.
        let (flavour, text, known, per_slot_from) = match info_field(server, "valkey_version") {
            Some(text) => ("valkey", text, VALKEY_KNOWN, (8, 0)),
            // 7.3.x were the release candidates of 7.4, which brought per-slot tables.
            None => match info_field(server, "redis_version") {
                Some(text) => ("redis", text, REDIS_KNOWN, (7, 3)),
                None => return Err("INFO server has no redis_version".to_owned()),
            },
        };
        let Some(release) = version(text) else {
            return Err(format!("{flavour} version {text} is not major.minor.patch"));
        };
        if !(known.0..=known.1).contains(&release) {
            return Err(format!(
                "{flavour} {text} is outside the releases whose SCAN cursor was read \
                 ({}.{} to {}.{})",
                known.0 .0, known.0 .1, known.1 .0, known.1 .1
            ));
        }
        Ok(match clustered && release >= per_slot_from {
            true => CursorOrder::SlotThenReversedBuckets,
            false => CursorOrder::ReversedBuckets,
        })
    }
}

/// `<name>_version` fields Redis and Valkey report in `INFO server`; any other (`dragonfly_version`,
/// …) is another server answering like Redis.
const OWN_VERSION_FIELDS: [&str; 3] = ["redis", "valkey", "gcc"];
/// Redis releases (major, minor) whose `SCAN` was read: one reversed-bit bucket index from 2.8
/// (`dictScan`) through 8.0, with the slot in the low 14 bits in cluster mode from 7.4
/// (`kvstoreScan`). Extend after reading a newer release's `src/kvstore.c` and `src/dict.c`.
const REDIS_KNOWN: ((u32, u32), (u32, u32)) = ((2, 8), (8, 0));
/// Valkey releases whose `SCAN` was read: 7.2 (Redis' `dictScan`), 8.0 (`kvstoreScan`, per-slot
/// tables in cluster mode) and 8.1 (the new `hashtable`, whose scan keeps the reversed-bit
/// cursor over its top-level buckets).
const VALKEY_KNOWN: ((u32, u32), (u32, u32)) = ((7, 2), (8, 1));

/// The value of `name` in an `INFO` reply (`name:value` lines).
fn info_field<'a>(info: &'a str, name: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix(name)?.strip_prefix(':'))
}

/// A primary as its own `CLUSTER NODES` line shows it. While this stays the same, the node holds
/// the same slots and every key of them, so a sweep of it is still complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardView {
    /// A replica promoted in its place has another id.
    pub id: String,
    /// Bumped when the node takes slots over (a failover, the end of a slot migration).
    pub config_epoch: u64,
    /// Slot ranges as listed, e.g. `0-5460`, `6000`.
    pub slots: Vec<String>,
}

impl Node {
    /// Checks this node's own line of `cluster_nodes` (its `CLUSTER NODES` reply) against what it
    /// said at discovery. `Err` says what changed: keys may have moved to or from a node the sweep
    /// already passed, so the sweep cannot vouch for its windows. A single server always passes.
    pub fn verify_shard(&self, cluster_nodes: &str) -> Result<(), String> {
        match &self.shard {
            Some(expected) => verify_against(expected, cluster_nodes),
            None => Ok(()),
        }
    }
}

fn verify_against(expected: &ShardView, cluster_nodes: &str) -> Result<(), String> {
    let Some(line) = cluster_nodes
        .lines()
        .filter_map(|line| NodeLine::parse(line).ok())
        .find(|line| line.has_flag("myself"))
    else {
        return Err("its CLUSTER NODES reply has no line for itself".to_owned());
    };
    if !line.migrating.is_empty() {
        return Err(format!(
            "slot migration in progress ({}): the sweep is repeated until it ends",
            line.migrating.join(" ")
        ));
    }
    if !line.has_flag("master") {
        return Err("it is no longer a primary".to_owned());
    }
    let now = line.shard_view();
    if &now != expected {
        return Err(format!(
            "its slots changed (was {} epoch {} [{}], now {} epoch {} [{}])",
            expected.id,
            expected.config_epoch,
            expected.slots.join(" "),
            now.id,
            now.config_epoch,
            now.slots.join(" ")
        ));
    }
    Ok(())
}

/// The plain URLs of the seeds a Redis URL lists after its scheme (`rest`): cluster URLs list
/// `user:pass@h1:p1,h2:p2/db`, and each host becomes `plain_scheme://user:pass@host/db`.
pub fn seed_urls(plain_scheme: &str, rest: &str) -> Vec<String> {
    let (userinfo, hosts_and_path) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let (hosts, path) = match hosts_and_path.find(['/', '?']) {
        Some(index) => hosts_and_path.split_at(index),
        None => (hosts_and_path, ""),
    };
    hosts
        .split(',')
        .filter(|host| !host.is_empty())
        .map(|host| match userinfo {
            Some(userinfo) => format!("{plain_scheme}://{userinfo}@{host}{path}"),
            None => format!("{plain_scheme}://{host}{path}"),
        })
        .collect()
}

/// A Redis URL written back from what the redis client parsed (each seed of a cluster URL, split
/// as `RedisTarget::parse` splits them), or `None` when it does not parse.
pub fn redacted_url(text: &str) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let plain_scheme = match scheme.as_str() {
        "redis" | "redis+cluster" => "redis",
        "rediss" | "rediss+cluster" => "rediss",
        "redis+sentinel" | "rediss+sentinel" => return redacted_sentinel_url(&scheme, rest),
        _ => {
            // unix:// and redis+unix://: one socket, the password (if any) in the query.
            let info = text.into_connection_info().ok()?;
            let settings = info.redis_settings();
            let ConnectionAddr::Unix(path) = info.addr() else {
                return None;
            };
            let mut query = Vec::new();
            if settings.db() != 0 {
                query.push(format!("db={}", settings.db()));
            }
            if let Some(user) = settings.username().filter(|user| !user.is_empty()) {
                query.push(format!("user={user}"));
            }
            if settings.password().is_some() {
                query.push("pass=***".to_owned());
            }
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{}", query.join("&"))
            };
            return Some(format!("{scheme}://{}{query}", path.display()));
        }
    };
    let infos = seed_urls(plain_scheme, rest)
        .into_iter()
        .map(|seed| seed.as_str().into_connection_info().ok())
        .collect::<Option<Vec<_>>>()?;
    let first = infos.first()?.redis_settings();
    let mut out = format!("{scheme}://");
    let user = first.username().filter(|user| !user.is_empty());
    if let Some(user) = user {
        out.push_str(user);
    }
    if first.password().is_some() {
        out.push_str(":***");
    }
    if user.is_some() || first.password().is_some() {
        out.push('@');
    }
    let addresses: Vec<String> = infos
        .iter()
        .map(|info| match info.addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
                format!("{host}:{port}")
            }
            other => other.to_string(),
        })
        .collect();
    out.push_str(&addresses.join(","));
    out.push_str(&format!("/{}", first.db()));
    Some(out)
}

/// A Sentinel URL with both passwords as `***`: the master's credentials as the redis client
/// reads them, the sentinels' parameters by name.
fn redacted_sentinel_url(scheme: &str, rest: &str) -> Option<String> {
    let url = SentinelUrl::split(rest).ok()?;
    let master_auth = url.userinfo.map(|u| format!("{u}@")).unwrap_or_default();
    let plain_scheme = scheme.trim_end_matches("+sentinel");
    let info = format!("{plain_scheme}://{master_auth}{}/{}", url.hosts[0], url.db)
        .as_str()
        .into_connection_info()
        .ok()?;
    let settings = info.redis_settings();
    let mut out = format!("{scheme}://");
    let user = settings.username().filter(|user| !user.is_empty());
    if let Some(user) = user {
        out.push_str(user);
    }
    if settings.password().is_some() {
        out.push_str(":***");
    }
    if user.is_some() || settings.password().is_some() {
        out.push('@');
    }
    out.push_str(&url.hosts.join(","));
    out.push_str(&format!("/{}/{}", url.service, url.db));
    let mut query = Vec::new();
    if let Some(user) = url.sentinel_user {
        query.push(format!("sentinel_username={user}"));
    }
    if url.sentinel_password.is_some() {
        query.push("sentinel_password=***".to_owned());
    }
    if !query.is_empty() {
        out.push('?');
        out.push_str(&query.join("&"));
    }
    Some(out)
}

/// Where the cache lives, parsed once from the URL.
#[derive(Clone)]
pub struct RedisTarget {
    seeds: Vec<Client>,
    /// Behind Sentinel: the sentinels to ask for the master (`seeds` is then empty).
    sentinels: Option<Arc<Sentinels>>,
    /// Every cluster node seen at the last discovery: more seeds, so that losing the nodes the URL
    /// names does not cut the worker off from a cluster that still works.
    known: Arc<Mutex<Vec<(String, u16)>>>,
    cluster: bool,
    ca: Option<Vec<u8>>,
    redacted: String,
    command_timeout: Duration,
    replica_policy: ReplicaPolicy,
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted)
    }
}

fn open_client(info: redis::ConnectionInfo, ca: Option<&[u8]>) -> redis::RedisResult<Client> {
    match ca {
        Some(pem) if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) => {
            Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem.to_vec()),
                },
            )
        }
        _ => Client::open(info),
    }
}

/// What a Redis URL names: the servers to connect to (one, or a cluster's seeds), or the
/// sentinels to ask; and whether it is a cluster. `Err` says what is wrong, without the URL.
fn servers(
    text: &str,
    ca: Option<&[u8]>,
) -> Result<(Vec<Client>, Option<Sentinels>, bool), String> {
    let (scheme, rest) = text.split_once("://").ok_or_else(|| {
        "expected redis://, rediss://, redis+cluster://, redis+sentinel:// or unix://".to_owned()
    })?;
    let (cluster, plain_scheme) = match scheme {
        // A Unix socket: `unix:///run/redis/redis.sock?db=0&user=…&pass=…` (the redis crate's
        // syntax; `redis+unix://` is the same). One server, never TLS.
        "unix" | "redis+unix" => {
            let info = text.into_connection_info().map_err(|e| e.to_string())?;
            let client = open_client(info, None).map_err(|e| e.to_string())?;
            return Ok((vec![client], None, false));
        }
        "redis" | "rediss" => (false, scheme),
        "redis+cluster" => (true, "redis"),
        "rediss+cluster" => (true, "rediss"),
        "redis+sentinel" | "rediss+sentinel" => {
            let plain_scheme = scheme.trim_end_matches("+sentinel");
            let sentinels = Sentinels::parse(plain_scheme, rest, |info| open_client(info, ca))?;
            return Ok((Vec::new(), Some(sentinels), false));
        }
        other => {
            return Err(format!(
                "scheme {other}:// (expected redis, rediss, redis+cluster, rediss+cluster, \
                 redis+sentinel, rediss+sentinel, unix or redis+unix)"
            ))
        }
    };
    let seeds = seed_urls(plain_scheme, rest)
        .into_iter()
        .map(|seed_url| {
            let info = seed_url
                .as_str()
                .into_connection_info()
                .map_err(|e| e.to_string())?;
            open_client(info, ca).map_err(|e| e.to_string())
        })
        .collect::<Result<Vec<_>, _>>()?;
    if seeds.is_empty() {
        return Err("no host".into());
    }
    if !cluster && seeds.len() > 1 {
        return Err("several hosts: use redis+cluster:// for a Redis Cluster".into());
    }
    Ok((seeds, None, cluster))
}

impl RedisTarget {
    /// Parses a Redis URL (see the module doc for the forms). Errors show the URL redacted.
    pub fn parse(
        url: &str,
        ca_file: Option<&Path>,
        command_timeout: Duration,
    ) -> Result<RedisTarget, NodeError> {
        let redacted = redacted_url(url).unwrap_or_else(|| NOT_SHOWN.to_owned());
        let invalid = |message: String| NodeError::InvalidUrl {
            url: redacted.clone(),
            message,
        };
        let ca = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| NodeError::CaFile {
                path: PathBuf::from(path).display().to_string(),
                message: e.to_string(),
            })?),
            None => None,
        };
        let (seeds, sentinels, cluster) = servers(url.trim(), ca.as_deref()).map_err(invalid)?;
        Ok(RedisTarget {
            seeds,
            sentinels: sentinels.map(Arc::new),
            known: Arc::default(),
            cluster,
            ca,
            redacted,
            command_timeout,
            replica_policy: ReplicaPolicy::default(),
        })
    }

    /// Which replicas of each node must have its deletes before a change is acknowledged
    /// (default: every connected replica, [`ReplicaPolicy::default`]).
    pub fn with_replicas(mut self, policy: ReplicaPolicy) -> RedisTarget {
        self.replica_policy = policy;
        self
    }

    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// Behind Sentinel: the masters the sentinels announce from now on (see [`Switches`]).
    /// `None` for a URL that names its servers.
    pub fn switches(&self) -> Option<Switches> {
        self.sentinels
            .as_ref()
            .map(|sentinels| sentinels.switches())
    }

    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.command_timeout))
    }

    async fn connect_client(&self, client: &Client) -> Result<Node, NodeError> {
        let name = node_name(client.get_connection_info().addr());
        let connection = client
            .get_multiplexed_async_connection_with_config(&self.connection_config())
            .await
            .map_err(|source| NodeError::Redis {
                node: name.clone(),
                source,
            })?;
        let info: redis::RedisResult<(String, String, String)> = redis::pipe()
            .cmd("INFO")
            .arg("server")
            .cmd("INFO")
            .arg("cluster")
            .cmd("INFO")
            .arg("replication")
            .query_async(&mut connection.clone())
            .await;
        let mut replicas = None;
        let cursor_order = match info {
            Ok((server, cluster, replication)) => {
                replicas = connected_replicas(&replication);
                // A plain URL to one primary of a cluster would sweep that primary's keys only.
                if !self.cluster && info_field(&cluster, "cluster_enabled") == Some("1") {
                    return Err(NodeError::ClusterNode { node: name });
                }
                CursorOrder::read(&server, &cluster).unwrap_or_else(|reason| {
                    tracing::warn!(node = %name, %reason, "SCAN cursor order not known for certain on this server: one lane from cursor 0, and a change that arrives during a pass waits for a whole pass of its own");
                    CursorOrder::Unknown
                })
            }
            // An ACL without INFO: sweep without trusting positions.
            Err(error)
                if !(error.is_io_error()
                    || error.is_timeout()
                    || error.is_connection_dropped()) =>
            {
                tracing::warn!(node = %name, %error, "INFO refused, so the SCAN cursor order is unknown: a change that arrives during a pass waits for a whole pass of its own");
                if self.replica_policy.counts_connected() {
                    tracing::warn!(node = %name, "INFO refused, so the replicas cannot be counted: changes are acknowledged without waiting for replicas (set --replica-acks to wait for a fixed number)");
                }
                CursorOrder::Unknown
            }
            Err(source) => {
                return Err(NodeError::Redis {
                    node: name.clone(),
                    source,
                })
            }
        };
        let resp3 = client.get_connection_info().clone();
        let resp3_settings = resp3
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let tracking_client =
            open_client(resp3.set_redis_settings(resp3_settings), self.ca.as_deref()).map_err(
                |source| NodeError::Redis {
                    node: name.clone(),
                    source,
                },
            )?;
        Ok(Node {
            name,
            connection,
            clustered: self.cluster,
            shard: None,
            cursor_order,
            tracking_client,
            replicas,
            replica_policy: self.replica_policy,
        })
    }

    /// Connects to the server, or discovers and connects to every primary of the cluster.
    pub async fn connect(&self) -> Result<Vec<Node>, NodeError> {
        if let Some(sentinels) = &self.sentinels {
            return Ok(vec![self.connect_master(sentinels).await?]);
        }
        if !self.cluster {
            return Ok(vec![self.connect_client(&self.seeds[0]).await?]);
        }
        let mut last_error = None;
        for seed in &self.seeds {
            match self.discover(seed).await {
                Ok(nodes) => return Ok(nodes),
                Err(error) => last_error = Some(error),
            }
        }
        let seed_names: Vec<String> = self
            .seeds
            .iter()
            .map(|seed| node_name(seed.get_connection_info().addr()))
            .collect();
        let known = self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for (host, port) in known {
            if seed_names.contains(&format!("{host}:{port}")) {
                continue;
            }
            let result = match self.client_at(&self.seeds[0], host, port) {
                Ok(client) => self.discover(&client).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(nodes) => return Ok(nodes),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| NodeError::Topology("no seed answered".into())))
    }

    /// Asks the sentinels for the master and connects to it, once `ROLE` confirmed it is one: a
    /// sentinel that has not seen a promotion yet names the old master, which may be back as a
    /// replica (deletes there would fail with `READONLY`, or be lost at its next resync).
    async fn connect_master(&self, sentinels: &Sentinels) -> Result<Node, NodeError> {
        let (host, port) = sentinels.master_address().await.map_err(|why| {
            NodeError::Sentinel(format!(
                "no master for service {:?} from the sentinels: {why}",
                sentinels.service
            ))
        })?;
        let client = open_client(sentinels.master_at(host, port), self.ca.as_deref())
            .map_err(|e| NodeError::Sentinel(e.to_string()))?;
        let mut node = self.connect_client(&client).await?;
        let role = sentinel::role(&mut node.connection)
            .await
            .map_err(|source| NodeError::Redis {
                node: node.name.clone(),
                source,
            })?;
        if role != "master" {
            return Err(NodeError::Sentinel(format!(
                "the sentinels name {} as the master of {:?}, but its ROLE is {role} \
                 (a failover is settling)",
                node.name, sentinels.service
            )));
        }
        // A replica that leaves from now on may be the one the sentinels promote: its deletes
        // must still be confirmed (see `replicas`), until the worker connects again.
        node.replica_policy.floor = node.replicas.unwrap_or(0);
        Ok(node)
    }

    /// A client for another node of the cluster, with the seed's scheme, TLS and credentials.
    fn client_at(&self, seed: &Client, host: String, port: u16) -> Result<Client, NodeError> {
        let info = at_address(seed.get_connection_info(), host, port);
        open_client(info, self.ca.as_deref()).map_err(|e| NodeError::Topology(e.to_string()))
    }

    async fn discover(&self, seed: &Client) -> Result<Vec<Node>, NodeError> {
        let mut node = self.connect_client(seed).await?;
        let text = cluster_nodes(&mut node).await?;
        let topology = Topology::parse(&text)?;
        *self
            .known
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = topology.reachable.clone();
        let mut nodes = Vec::with_capacity(topology.primaries.len());
        for primary in topology.primaries {
            let client = self.client_at(seed, primary.host.clone(), primary.port)?;
            let mut node = self.connect_client(&client).await?;
            // The node's own word, not the seed's: the sweep later compares it with the same source.
            let own = cluster_nodes(&mut node).await?;
            let myself = own
                .lines()
                .filter_map(|line| NodeLine::parse(line).ok())
                .find(|line| line.has_flag("myself"))
                .ok_or_else(|| NodeError::Topology(format!("{}: no line for itself", node.name)))?;
            let view = myself.shard_view();
            if !myself.has_flag("master") || view.id != primary.id || view.slots != primary.slots {
                return Err(NodeError::Topology(format!(
                    "{} disagrees with the seed about its role or slots (a failover is settling)",
                    node.name
                )));
            }
            node.shard = Some(view);
            nodes.push(node);
        }
        Ok(nodes)
    }
}

async fn cluster_nodes(node: &mut Node) -> Result<String, NodeError> {
    redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut node.connection)
        .await
        .map_err(|source| NodeError::Redis {
            node: node.name.clone(),
            source,
        })
}

fn node_name(addr: &ConnectionAddr) -> String {
    match addr {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
        _ => "redis".to_owned(),
    }
}

/// One line of `CLUSTER NODES`:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <state> <slot>…`
#[derive(Debug, Clone)]
struct NodeLine {
    id: String,
    host: String,
    port: u16,
    flags: Vec<String>,
    config_epoch: u64,
    /// Ranges served, e.g. `0-5460` or `6000`.
    slots: Vec<String>,
    /// Migration markers, `[slot->-target]` or `[slot-<-source]`: only on the node's own line.
    migrating: Vec<String>,
}

impl NodeLine {
    fn parse(line: &str) -> Result<NodeLine, NodeError> {
        let bad = |why: &str| NodeError::Topology(format!("CLUSTER NODES line {line:?}: {why}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(bad("too few fields"));
        }
        let address = fields[1].split(['@', ',']).next().unwrap_or(fields[1]);
        let (host, port) = address.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let (slots, migrating) = fields[8..]
            .iter()
            .map(|slot| slot.to_string())
            .partition(|slot| !slot.starts_with('['));
        Ok(NodeLine {
            id: fields[0].to_owned(),
            host: host.trim_matches(['[', ']']).to_owned(),
            // A node without an address (`noaddr`) shows port 0: it is skipped by its flags.
            port: port.parse().map_err(|_| bad("bad port"))?,
            flags: fields[2].split(',').map(str::to_owned).collect(),
            config_epoch: fields[6].parse().map_err(|_| bad("bad config epoch"))?,
            slots,
            migrating,
        })
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    /// Failed, address-less or still joining: nothing to connect to.
    fn unusable(&self) -> bool {
        ["fail", "noaddr", "handshake"]
            .iter()
            .any(|flag| self.has_flag(flag))
    }

    fn shard_view(&self) -> ShardView {
        ShardView {
            id: self.id.clone(),
            config_epoch: self.config_epoch,
            slots: self.slots.clone(),
        }
    }

    /// Marks the slots of the listed ranges in `served` (one flag per slot).
    fn mark_slots(&self, served: &mut [bool]) -> Result<(), NodeError> {
        for range in &self.slots {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            let parse = |slot: &str| {
                slot.parse::<usize>()
                    .ok()
                    .filter(|slot| *slot < CLUSTER_SLOTS)
                    .ok_or_else(|| NodeError::Topology(format!("bad slot range {range:?}")))
            };
            let (first, last) = (parse(first)?, parse(last)?);
            for slot in served.iter_mut().take(last + 1).skip(first) {
                *slot = true;
            }
        }
        Ok(())
    }
}

/// What a seed's `CLUSTER NODES` says: the primaries to sweep and every node worth asking next time.
#[derive(Debug)]
struct Topology {
    primaries: Vec<ShardLine>,
    reachable: Vec<(String, u16)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ShardLine {
    id: String,
    host: String,
    port: u16,
    slots: Vec<String>,
}

impl Topology {
    /// The primaries serving slots. Fails unless together they serve every slot: between a
    /// primary's failure and its replica's promotion part of the keyspace has no primary, and a
    /// sweep of the others would acknowledge changes whose keys it never saw.
    fn parse(text: &str) -> Result<Topology, NodeError> {
        let mut primaries = Vec::new();
        let mut reachable = Vec::new();
        // Counted slot by slot: a stale view can list two owners for one range.
        let mut served = vec![false; CLUSTER_SLOTS];
        for line in text.lines().filter(|line| !line.trim().is_empty()) {
            let line = NodeLine::parse(line)?;
            if line.unusable() {
                continue;
            }
            reachable.push((line.host.clone(), line.port));
            if line.has_flag("master") && !line.slots.is_empty() {
                line.mark_slots(&mut served)?;
                primaries.push(ShardLine {
                    id: line.id,
                    host: line.host,
                    port: line.port,
                    slots: line.slots,
                });
            }
        }
        if primaries.is_empty() {
            return Err(NodeError::Topology(
                "no primary serving slots (is the cluster created?)".into(),
            ));
        }
        let unserved = served.iter().filter(|served| !**served).count();
        if unserved > 0 {
            return Err(NodeError::Topology(format!(
                "{unserved} of {CLUSTER_SLOTS} slots have no reachable primary (a failover in progress?)"
            )));
        }
        Ok(Topology {
            primaries,
            reachable,
        })
    }
}

/// `info`'s scheme, TLS settings, credentials and database, at another address: how a cluster's
/// other nodes and a Sentinel-named master are reached like the server the URL named.
pub(crate) fn at_address(
    info: &redis::ConnectionInfo,
    host: String,
    port: u16,
) -> redis::ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => ConnectionAddr::TcpTls {
            host,
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host, port),
    };
    info.clone().set_addr(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis(version: &str, mode: &str) -> String {
        format!("# Server\r\nredis_version:{version}\r\nredis_git_sha1:0\r\nredis_mode:{mode}\r\ngcc_version:12.2.0\r\n")
    }

    fn valkey(version: &str, mode: &str) -> String {
        format!(
            "# Server\r\nredis_version:7.2.4\r\nserver_name:valkey\r\nvalkey_version:{version}\r\n\
             server_mode:{mode}\r\n"
        )
    }

    const ON: &str = "# Cluster\r\ncluster_enabled:1\r\n";
    const OFF: &str = "# Cluster\r\ncluster_enabled:0\r\n";

    #[test]
    fn unix_socket_urls_name_one_server_and_hide_the_password() {
        for url in [
            "unix:///run/redis/redis.sock",
            "redis+unix:///run/redis/redis.sock?db=2&pass=s3cret",
        ] {
            let target = RedisTarget::parse(url, None, Duration::from_secs(1))
                .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert!(!target.is_cluster());
            assert_eq!(
                node_name(target.seeds[0].get_connection_info().addr()),
                "/run/redis/redis.sock"
            );
            assert!(
                !target.redacted().contains("s3cret"),
                "{}",
                target.redacted()
            );
        }
        let error = RedisTarget::parse("unix://relative.sock", None, Duration::from_secs(1));
        assert!(error.is_err(), "a socket path must be absolute");
    }

    #[test]
    fn the_cursor_order_follows_the_server_and_its_mode() {
        use CursorOrder::*;
        let order = CursorOrder::from_info;
        assert_eq!(order(&redis("7.0.15", "cluster"), ON), ReversedBuckets);
        assert_eq!(order(&redis("7.2.4", "cluster"), ON), ReversedBuckets);
        assert_eq!(
            order(&redis("7.4.2", "cluster"), ON),
            SlotThenReversedBuckets
        );
        assert_eq!(
            order(&redis("8.0.2", "cluster"), ON),
            SlotThenReversedBuckets
        );
        assert_eq!(order(&redis("8.0.2", "standalone"), OFF), ReversedBuckets);
        assert_eq!(order(&redis("2.8.24", "standalone"), OFF), ReversedBuckets);
        assert_eq!(
            order(&valkey("8.1.1", "cluster"), ON),
            SlotThenReversedBuckets
        );
        assert_eq!(order(&valkey("8.0.1", "standalone"), OFF), ReversedBuckets);
        assert_eq!(order(&valkey("7.2.5", "cluster"), ON), ReversedBuckets);
        // Valkey asked to look like Redis writes `redis_mode`.
        let compat = valkey("8.0.1", "x").replace("server_mode:x", "redis_mode:standalone");
        assert_eq!(order(&compat, OFF), ReversedBuckets);
    }

    #[test]
    fn a_server_whose_cursor_order_is_not_known_for_certain_is_unknown() {
        use CursorOrder::*;
        let order = CursorOrder::read;
        let unknown = |server: &str, cluster: &str| {
            let reason = order(server, cluster).expect_err("not known for certain");
            assert_eq!(CursorOrder::from_info(server, cluster), Unknown);
            reason
        };
        // Releases nobody read yet, in either mode, and ones from before SCAN existed as read.
        assert!(unknown(&redis("8.2.1", "standalone"), OFF).contains("redis 8.2.1"));
        unknown(&redis("9.0.0", "cluster"), ON);
        unknown(&redis("2.6.17", "standalone"), OFF);
        unknown(&valkey("8.2.0", "standalone"), OFF);
        unknown(&valkey("9.0.0", "cluster"), ON);
        unknown(&redis("eight", "standalone"), OFF);
        // Other servers answering like Redis.
        let dragonfly = redis("7.4.0", "standalone") + "dragonfly_version:df-v1.2\r\n";
        assert!(unknown(&dragonfly, OFF).contains("dragonfly_version"));
        unknown(
            &(redis("7.2.0", "standalone") + "garnet_version:1.0\r\n"),
            OFF,
        );
        // A proxy's INFO: no mode, or a mode at odds with cluster_enabled.
        unknown("# Server\r\nredis_version:7.2.4\r\n", OFF);
        unknown(&redis("7.2.4", "cluster"), OFF);
        unknown(&redis("7.2.4", "standalone"), ON);
        unknown(&redis("7.2.4", "sentinel"), OFF);
        // Unreadable replies.
        unknown(&redis("7.4.2", "cluster"), "");
        unknown("", ON);
    }

    const NODES: &str = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                         b 127.0.0.1:7001@17001,cache-b master - 0 0 2 connected 5461-10922\n\
                         c 127.0.0.1:7003@17003 slave a 0 0 1 connected\n\
                         d 127.0.0.1:7002@17002 master - 0 0 3 connected 10923-16383\n";

    #[test]
    fn cluster_nodes_output_yields_serving_primaries_and_every_reachable_node() {
        let topology = Topology::parse(NODES).expect("parses");
        let primaries: Vec<(&str, u16)> = topology
            .primaries
            .iter()
            .map(|p| (p.host.as_str(), p.port))
            .collect();
        assert_eq!(
            primaries,
            [
                ("127.0.0.1", 7000),
                ("127.0.0.1", 7001),
                ("127.0.0.1", 7002)
            ]
        );
        assert_eq!(topology.reachable.len(), 4);
    }

    #[test]
    fn a_failed_primary_not_yet_replaced_makes_discovery_wait() {
        let failing = NODES.replace("master - 0 0 3", "master,fail - 0 0 3");
        let error = Topology::parse(&failing).expect_err("slots uncovered");
        assert!(error.to_string().contains("5461 of 16384 slots"), "{error}");
        // Suspected (`fail?`) but still the owner: it is tried, and the connection decides.
        let suspected = NODES.replace("master - 0 0 3", "master,fail? - 0 0 3");
        assert_eq!(
            Topology::parse(&suspected).expect("parses").primaries.len(),
            3
        );
        // A stale view listing a range twice does not hide a gap elsewhere.
        let doubled = NODES.replace("10923-16383", "0-5460");
        assert!(Topology::parse(&doubled).is_err());
    }

    #[test]
    fn a_sweep_vouches_for_a_node_only_while_its_own_line_is_unchanged() {
        let me = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460";
        let expected = NodeLine::parse(me).expect("parses").shard_view();
        let check = |now: &str| verify_against(&expected, now);
        assert_eq!(check(me), Ok(()));
        let migrating = format!("{me} [100->-b]");
        assert!(check(&migrating)
            .expect_err("migrating")
            .contains("migration"));
        let importing = me.replace("0-5460", "0-5460 [6000-<-b]");
        assert!(check(&importing).is_err());
        let grown = me.replace("connected 0-5460", "connected 0-5460 6000");
        assert!(check(&grown).expect_err("slots").contains("slots changed"));
        let bumped = me.replace("- 0 0 1", "- 0 0 7");
        assert!(check(&bumped).is_err());
        let demoted = "a 127.0.0.1:7000@17000 myself,slave z 0 0 7 connected";
        assert!(check(demoted)
            .expect_err("demoted")
            .contains("no longer a primary"));
        assert!(check("b 127.0.0.1:7001@17001 master - 0 0 2 connected 1-2").is_err());
    }

    #[test]
    fn sentinel_urls_hide_both_passwords_and_name_a_bad_part() {
        let timeout = Duration::from_secs(1);
        let url = "redis+sentinel://app:m%40ster@127.0.0.1:26379,127.0.0.1:26380/cache/2\
                   ?sentinel_username=sen&sentinel_password=s3ntinel";
        let target = RedisTarget::parse(url, None, timeout).expect("parses");
        assert_eq!(
            target.redacted(),
            "redis+sentinel://app:***@127.0.0.1:26379,127.0.0.1:26380/cache/2\
             ?sentinel_username=sen&sentinel_password=***"
        );
        let tls =
            RedisTarget::parse("rediss+sentinel://h:26379/cache", None, timeout).expect("parses");
        assert_eq!(tls.redacted(), "rediss+sentinel://h:26379/cache/0");
        for (bad, part) in [
            ("redis+sentinel://:pw@h:26379", "service name"),
            ("redis+sentinel://:pw@h/cache", "not host:port"),
            ("redis+sentinel://:pw@h:1/cache/x", "not a number"),
            (
                "redis+sentinel://:pw@h:1/cache?sentinel_pass=pw",
                "query parameter",
            ),
        ] {
            let error = RedisTarget::parse(bad, None, timeout)
                .expect_err(bad)
                .to_string();
            assert!(error.contains(part), "{bad}: {error}");
            assert!(!error.contains("pw@") && !error.contains("=pw"), "{error}");
        }
    }

    #[test]
    fn urls_are_checked_and_redacted() {
        let timeout = Duration::from_secs(1);
        let cluster = RedisTarget::parse(
            "redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001",
            None,
            timeout,
        )
        .expect("parses");
        assert!(cluster.is_cluster());
        assert_eq!(cluster.seeds.len(), 2);
        let error = RedisTarget::parse("http://:pw@h:1", None, timeout)
            .expect_err("bad scheme")
            .to_string();
        assert!(error.contains("http") && !error.contains("pw@"), "{error}");
    }
}
