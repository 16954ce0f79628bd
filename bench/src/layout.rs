//! The benchmark's django-redis keyspace layout: a deterministic function of its [`Layout`], so the bench
//! can say which keys a change must remove without storing a million names, and fill Redis fast
//! with pipelined `SET`s.
//!
//! Shares of a keyspace of N keys (close to the app's): ~61 % report details (`:1:report:{id}:
//! {user}:{h}` and the three other kinds, 1–14 per report), ~20 % list pages
//! (`:1:reportlist:{resource}:{user}:{h}`, 1–19 per user and resource), ~19 % keys no rule touches
//! (sessions, template fragments, `:1:cache_stats:{user}`). The rules name the first two, which
//! index mode indexes: 81 %, so the 5M keyspace holds the 4M indexed keys of index mode's memory
//! target (4,053,829 of 5,003,829).

use std::collections::{BTreeSet, HashSet};

use cache_invalidator::rules::{Change, RuleSet};
use tokio::task::JoinSet;

use crate::nodes::Nodes;
use crate::stats::hash;

/// One of the four report tables and the keys its rows own.
pub struct Kind {
    pub table: &'static str,
    /// Namespace of the detail keys: `:1:{namespace}:{id}:…`.
    pub namespace: &'static str,
    /// List resource: `:1:reportlist:{resource}:{user}:…`.
    pub resource: &'static str,
    /// Columns naming users whose lists show the row.
    pub owners: &'static [&'static str],
    /// A text column an UPDATE can change without touching the owners.
    pub text: &'static str,
}

pub const KINDS: [Kind; 4] = [
    Kind {
        table: "reports_report",
        namespace: "report",
        resource: "reports",
        owners: &["author_id"],
        text: "title",
    },
    Kind {
        table: "reports_studentreport",
        namespace: "studentreport",
        resource: "student-reports",
        owners: &["student_id", "teacher_id"],
        text: "title",
    },
    Kind {
        table: "reports_tutorweeklyreport",
        namespace: "tutorreport",
        resource: "tutor-reports",
        owners: &["tutor_id", "student_id"],
        text: "notes",
    },
    Kind {
        table: "reports_teacherweeklyreport",
        namespace: "teacherreport",
        resource: "teacher-reports",
        owners: &["teacher_id", "student_id"],
        text: "notes",
    },
];

/// Cached values are pickled report fragments: their size barely matters to `SCAN`, but it keeps
/// Redis' memory realistic.
const VALUE: &[u8] = &[b'v'; 120];
/// `SET`s per pipeline while filling, and pipelines in flight (over all primaries): enough to
/// keep Redis busy.
const FILL_BATCH: usize = 5_000;
const FILL_IN_FLIGHT: usize = 4;

/// How many reports and users a keyspace of about `keys` keys has.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Report ids with cached keys, per kind (`1..=reports`).
    pub reports: u32,
    pub users: u32,
    /// Rows per report table in the database: at least 10,000 for the bulk-UPDATE measure.
    pub rows: u32,
    pub sessions: u32,
    pub fragments: u32,
}

impl Layout {
    pub fn for_keys(keys: u64) -> Layout {
        // 4 kinds × 7.5 detail keys per report on average: 61 % of the keys.
        let reports = (keys / 49).max(10) as u32;
        // 4 kinds × 10 list pages per user on average: 20 %.
        let users = (keys / 200).max(10) as u32;
        let unrelated = keys * 19 / 100;
        let sessions = (unrelated * 3 / 5) as u32;
        Layout {
            reports,
            users,
            rows: reports.max(10_000),
            sessions,
            fragments: (unrelated as u32).saturating_sub(sessions + users),
        }
    }

    /// The owner a fresh row has in column `column` (an index into the kind's owners). The SQL that
    /// fills the tables computes the same: `1 + (id * OWNER_FACTOR[c] + kind) % users`.
    pub fn initial_owner(&self, kind: usize, column: usize, id: u32) -> u32 {
        1 + ((u64::from(id) * OWNER_FACTOR[column] + kind as u64) % u64::from(self.users)) as u32
    }

    pub fn detail_keys(&self, kind: usize, id: u32) -> Vec<String> {
        if id > self.reports {
            return Vec::new();
        }
        let k = kind as u64;
        let count = 1 + hash(&[1, k, id.into()]) % 14;
        (0..count)
            .map(|j| {
                let user = 1 + hash(&[2, k, id.into(), j]) % u64::from(self.users);
                format!(
                    ":1:{}:{id}:{user}:{}",
                    KINDS[kind].namespace,
                    hex32(&[3, k, id.into(), j])
                )
            })
            .collect()
    }

    pub fn list_keys(&self, kind: usize, user: u32) -> Vec<String> {
        let k = kind as u64;
        let count = 1 + hash(&[4, k, user.into()]) % 19;
        (0..count)
            .map(|j| {
                format!(
                    ":1:reportlist:{}:{user}:{}",
                    KINDS[kind].resource,
                    hex32(&[5, k, user.into(), j])
                )
            })
            .collect()
    }

    /// Every key, in a fixed order.
    pub fn all_keys(&self) -> impl Iterator<Item = String> + '_ {
        let details = (0..KINDS.len()).flat_map(move |kind| {
            (1..=self.reports).flat_map(move |id| self.detail_keys(kind, id))
        });
        let lists = (0..KINDS.len()).flat_map(move |kind| {
            (1..=self.users).flat_map(move |user| self.list_keys(kind, user))
        });
        let stats = (1..=self.users).map(|user| format!(":1:cache_stats:{user}"));
        let sessions = (0..self.sessions)
            .map(|i| format!(":1:django.contrib.sessions.cache{}", hex32(&[6, i.into()])));
        let fragments = (0..self.fragments)
            .map(|i| format!(":1:template.cache.report_sidebar.{}", hex32(&[7, i.into()])));
        details
            .chain(lists)
            .chain(stats)
            .chain(sessions)
            .chain(fragments)
    }

    /// A key the app reads: any key of the layout (a GET of a removed key costs the same).
    pub fn some_key(&self, pick: u64) -> String {
        let kind = (pick % 4) as usize;
        match (pick >> 2) % 3 {
            0 => self
                .detail_keys(kind, 1 + ((pick >> 8) % u64::from(self.reports)) as u32)
                .swap_remove(0),
            1 => self
                .list_keys(kind, 1 + ((pick >> 8) % u64::from(self.users)) as u32)
                .swap_remove(0),
            _ => format!(":1:cache_stats:{}", 1 + (pick >> 8) % u64::from(self.users)),
        }
    }
}

/// Multipliers of the initial owner formula, per owner column, so two owners of a row differ.
pub const OWNER_FACTOR: [u64; 2] = [7_919, 104_729];

/// 32 hex digits, like the md5 of a query string django keys carry.
fn hex32(parts: &[u64]) -> String {
    let high = hash(parts);
    format!("{high:016x}{:016x}", hash(&[high]))
}

/// One changed row, before and after: what a change must clear.
#[derive(Debug, Clone)]
pub struct RowChange {
    pub kind: usize,
    pub id: u32,
    pub old_owners: Vec<u32>,
    pub new_owners: Vec<u32>,
}

impl RowChange {
    /// The keys this change must remove, computed from the layout (not from the rules: the bench
    /// checks the daemon against an independent statement of the default rules).
    pub fn must_go(&self, layout: &Layout, into: &mut HashSet<String>) {
        into.extend(layout.detail_keys(self.kind, self.id));
        for &user in self.old_owners.iter().chain(&self.new_owners) {
            into.extend(layout.list_keys(self.kind, user));
        }
    }

    /// The patterns the daemon's rules give for this change, as the worker would expand its outbox
    /// row.
    pub fn patterns(&self, rules: &RuleSet) -> BTreeSet<String> {
        let values = self.outbox_rows();
        rules
            .expand(&Change {
                table: KINDS[self.kind].table,
                operation: "UPDATE",
                rows: Some(&values),
            })
            .expect("the built-in rules expand a report row")
            .patterns
    }

    /// The row values the trigger records, OLD then NEW, as the outbox holds them.
    pub fn outbox_rows(&self) -> serde_json::Value {
        let object = |owners: &[u32]| {
            let mut map = serde_json::Map::new();
            map.insert("id".into(), self.id.into());
            for (column, owner) in KINDS[self.kind].owners.iter().zip(owners) {
                map.insert((*column).into(), (*owner).into());
            }
            serde_json::Value::Object(map)
        };
        serde_json::Value::Array(vec![object(&self.old_owners), object(&self.new_owners)])
    }
}

/// Fills Redis with the layout's keys, each on its primary; returns how many it holds afterwards
/// (`DBSIZE` summed over the primaries).
pub async fn fill(nodes: &Nodes, layout: &Layout) -> u64 {
    fill_keys(nodes, layout.all_keys()).await
}

/// Fills Redis with `keys` (pipelined `SET`s, each on its key's primary); returns how many keys
/// it holds afterwards.
pub async fn fill_keys(nodes: &Nodes, mut keys: impl Iterator<Item = String>) -> u64 {
    let mut batches: Vec<Vec<String>> = vec![Vec::new(); nodes.len()];
    let mut in_flight = JoinSet::new();
    loop {
        let key = keys.next();
        let done = key.is_none();
        if let Some(key) = key {
            batches[nodes.router.node_of(&key)].push(key);
        }
        for (node, batch) in batches.iter_mut().enumerate() {
            if batch.is_empty() || (batch.len() < FILL_BATCH && !done) {
                continue;
            }
            if in_flight.len() >= FILL_IN_FLIGHT {
                if let Some(Err(error)) = in_flight.join_next().await {
                    panic!("a fill pipeline failed: {error}");
                }
            }
            let batch = std::mem::take(batch);
            let mut connection = nodes.connections[node].clone();
            in_flight.spawn(async move {
                let mut pipe = redis::pipe();
                for key in &batch {
                    pipe.cmd("SET").arg(key).arg(VALUE).ignore();
                }
                let () = pipe
                    .query_async(&mut connection)
                    .await
                    .expect("filling the private redis");
            });
        }
        if done {
            break;
        }
    }
    while let Some(finished) = in_flight.join_next().await {
        if let Err(error) = finished {
            panic!("a fill pipeline failed: {error}");
        }
    }
    nodes.dbsize().await
}
