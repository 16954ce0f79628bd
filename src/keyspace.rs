//! Connecting to the Redis that holds the cache: one server (`redis://`, `rediss://`) or every
//! primary of a Redis Cluster (`redis+cluster://host:port,host:port`, `rediss+cluster://…`).
//!
//! A sweep must see every key, and `SCAN` walks one node's keyspace, so in a cluster the worker
//! keeps one plain connection per primary (discovered with `CLUSTER NODES`, rediscovered after any
//! failure) rather than the cluster client, which routes by key and cannot scan.

use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo};

use crate::settings::SecretUrl;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum KeyspaceError {
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
}

impl KeyspaceError {
    /// Configuration errors will not heal by retrying.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            KeyspaceError::InvalidUrl { .. } | KeyspaceError::CaFile { .. }
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
}

/// Where the cache lives, parsed once from the URL.
#[derive(Clone)]
pub struct RedisTarget {
    seeds: Vec<Client>,
    cluster: bool,
    ca: Option<Vec<u8>>,
    redacted: String,
    command_timeout: Duration,
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

impl RedisTarget {
    pub fn parse(
        url: &SecretUrl,
        ca_file: Option<&Path>,
        command_timeout: Duration,
    ) -> Result<RedisTarget, KeyspaceError> {
        let redacted = url.redacted();
        let invalid = |message: String| KeyspaceError::InvalidUrl {
            url: redacted.clone(),
            message,
        };
        let ca = match ca_file {
            Some(path) => Some(std::fs::read(path).map_err(|e| KeyspaceError::CaFile {
                path: PathBuf::from(path).display().to_string(),
                message: e.to_string(),
            })?),
            None => None,
        };
        let text = url.expose();
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| invalid("expected redis://, rediss:// or redis+cluster://".into()))?;
        let (cluster, plain_scheme) = match scheme {
            "redis" | "rediss" => (false, scheme),
            "redis+cluster" => (true, "redis"),
            "rediss+cluster" => (true, "rediss"),
            other => {
                return Err(invalid(format!(
                    "scheme {other}:// (expected redis, rediss, redis+cluster or rediss+cluster)"
                )))
            }
        };
        // Cluster URLs list seeds: user:pass@h1:p1,h2:p2/db. Each seed becomes a plain URL.
        let (userinfo, hosts_and_path) = match rest.rfind('@') {
            Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
            None => (None, rest),
        };
        let (hosts, path) = match hosts_and_path.find(['/', '?']) {
            Some(index) => hosts_and_path.split_at(index),
            None => (hosts_and_path, ""),
        };
        let seeds = hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| {
                let seed_url = match userinfo {
                    Some(userinfo) => format!("{plain_scheme}://{userinfo}@{host}{path}"),
                    None => format!("{plain_scheme}://{host}{path}"),
                };
                let info = seed_url
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| invalid(e.to_string()))?;
                open_client(info, ca.as_deref()).map_err(|e| invalid(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if seeds.is_empty() {
            return Err(invalid("no host".into()));
        }
        if !cluster && seeds.len() > 1 {
            return Err(invalid(
                "several hosts: use redis+cluster:// for a Redis Cluster".into(),
            ));
        }
        Ok(RedisTarget {
            seeds,
            cluster,
            ca,
            redacted,
            command_timeout,
        })
    }

    pub fn redacted(&self) -> &str {
        &self.redacted
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    fn connection_config(&self) -> AsyncConnectionConfig {
        AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(self.command_timeout))
    }

    async fn connect_client(&self, client: &Client) -> Result<Node, KeyspaceError> {
        let name = node_name(client.get_connection_info().addr());
        let connection = client
            .get_multiplexed_async_connection_with_config(&self.connection_config())
            .await
            .map_err(|source| KeyspaceError::Redis {
                node: name.clone(),
                source,
            })?;
        Ok(Node {
            name,
            connection,
            clustered: self.cluster,
        })
    }

    /// Connects to the server, or discovers and connects to every primary of the cluster.
    pub async fn connect(&self) -> Result<Vec<Node>, KeyspaceError> {
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
        Err(last_error.unwrap_or_else(|| KeyspaceError::Topology("no seed answered".into())))
    }

    async fn discover(&self, seed: &Client) -> Result<Vec<Node>, KeyspaceError> {
        let mut node = self.connect_client(seed).await?;
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut node.connection)
            .await
            .map_err(|source| KeyspaceError::Redis {
                node: node.name.clone(),
                source,
            })?;
        let primaries = parse_primaries(&text)?;
        let seed_info = seed.get_connection_info().clone();
        let mut nodes = Vec::with_capacity(primaries.len());
        for (host, port) in primaries {
            let addr = match seed_info.addr() {
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
            let client = open_client(seed_info.clone().set_addr(addr), self.ca.as_deref())
                .map_err(|e| KeyspaceError::Topology(e.to_string()))?;
            nodes.push(self.connect_client(&client).await?);
        }
        Ok(nodes)
    }
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

/// The primaries that serve slots, from `CLUSTER NODES` output:
/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <state> <slots>…`
fn parse_primaries(text: &str) -> Result<Vec<(String, u16)>, KeyspaceError> {
    let mut primaries = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return Err(KeyspaceError::Topology(format!(
                "unexpected CLUSTER NODES line {line:?}"
            )));
        }
        let flags = fields[2];
        let serves_slots = fields.len() > 8;
        let usable = flags.split(',').any(|flag| flag == "master")
            && !flags
                .split(',')
                .any(|flag| matches!(flag, "fail" | "noaddr" | "handshake"));
        if !(usable && serves_slots) {
            continue;
        }
        let address = fields[1].split(['@', ',']).next().unwrap_or(fields[1]);
        let (host, port) = address.rsplit_once(':').ok_or_else(|| {
            KeyspaceError::Topology(format!("node address {address:?} has no port"))
        })?;
        let port: u16 = port
            .parse()
            .map_err(|_| KeyspaceError::Topology(format!("node address {address:?}: bad port")))?;
        primaries.push((host.trim_matches(['[', ']']).to_owned(), port));
    }
    if primaries.is_empty() {
        return Err(KeyspaceError::Topology(
            "no primary serving slots (is the cluster created?)".into(),
        ));
    }
    Ok(primaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_output_yields_serving_primaries() {
        let text = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922\n\
                    c 127.0.0.1:7003@17003 slave a 0 0 1 connected\n\
                    d 127.0.0.1:7002@17002 master,fail - 0 0 3 connected 10923-16383\n";
        let primaries = parse_primaries(text).expect("parses");
        assert_eq!(
            primaries,
            [
                ("127.0.0.1".to_owned(), 7000),
                ("127.0.0.1".to_owned(), 7001)
            ]
        );
    }

    #[test]
    fn urls_are_checked_and_redacted() {
        let timeout = Duration::from_secs(1);
        let cluster = RedisTarget::parse(
            &SecretUrl::new("redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001"),
            None,
            timeout,
        )
        .expect("parses");
        assert!(cluster.is_cluster());
        assert_eq!(cluster.seeds.len(), 2);
        let error = RedisTarget::parse(&SecretUrl::new("http://:pw@h:1"), None, timeout)
            .expect_err("bad scheme")
            .to_string();
        assert!(error.contains("http") && !error.contains("pw@"), "{error}");
    }
}
