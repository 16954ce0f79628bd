//! No key survives its change, whatever else writes to Redis: an app's refill coalesced with the
//! daemon's own delete into one announcement (alone, or among many keys whose existence the index
//! checks with one `EXISTS`), a database swapped in without announcements, and a
//! randomized mix of other clients' writes of every kind (TTLs, RENAME, MOVE, COPY, RESTORE,
//! MULTI, EVAL, SWAPDB, FLUSHDB of another database, evictions under `maxmemory`) interleaved
//! with row changes and the SQL request functions.
//!
//! Each test has a `redis-server` of its own (they pause it, swap and flush its databases, and
//! squeeze its memory) and runs the daemon in the suite's mode (`TEST_MODE`).

mod common;

use std::time::{Duration, Instant};

use cache_invalidator::settings::{Mode, Settings};
use common::*;
use redis::aio::MultiplexedConnection;

const REPORTS: i32 = 12;
const USERS: u32 = 3;

/// The daemon in the suite's mode; in index mode, once its index is seeded; and once it cleared
/// the changes of the reports' inserts.
async fn start_daemon(settings: Settings, db: &TestDb) -> Daemon {
    let daemon = Daemon::start(settings);
    if !matches!(test_mode(), Mode::Sweep) {
        daemon.wait_index_complete().await;
    }
    db.wait_for_empty_outbox(PATIENCE).await;
    daemon
}

/// A private Redis, a key space, and a database with reports 1 to [`REPORTS`] by user 1.
async fn setup(tag: &str) -> (PrivateRedis, KeyPrefix, TestDb, tokio_postgres::Client) {
    let private = PrivateRedis::start();
    let space = KeyPrefix::new(tag);
    let db = TestDb::with_reports(tag, &space.rules()).await;
    let client = db.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO auth_user (id) SELECT generate_series(1, {USERS});
             INSERT INTO reports_report (id, title, author_id)
             SELECT g, 'r', 1 FROM generate_series(1, {REPORTS}) g"
        ))
        .await
        .expect("reports");
    (private, space, db, client)
}

/// A connection to database `db` of the private server.
async fn connection_to(private: &PrivateRedis, db: u32) -> MultiplexedConnection {
    redis_connection(&format!("redis://127.0.0.1:{}/{db}", private.port)).await
}

async fn run(connection: &mut MultiplexedConnection, command: &mut redis::Cmd) -> redis::Value {
    command
        .query_async(connection)
        .await
        .unwrap_or_else(|error| panic!("{command:?}: {error}"))
}

/// Sends a command another client might send, which Redis may refuse (a RENAME of a missing key,
/// a COPY onto itself): its effect, if any, is what counts.
async fn attempt(
    connection: &mut MultiplexedConnection,
    command: &mut redis::Cmd,
) -> Option<redis::Value> {
    command.query_async(connection).await.ok()
}

/// `SET k`; the server pauses writes; a change's `UNLINK` of `k` is held; another client's `SET k`
/// is held behind it; both run in one pass of Redis' event loop on unpausing, which announces `k`
/// once. The next change must still clear `k`. With `siblings`, the change deletes that many other
/// keys with `k`: in index mode their announcements are checked with `k`'s in groups (one `EXISTS`
/// for many keys), and the group holding `k` finds it.
async fn refill_coalesced_with_the_daemons_delete(
    tag: &str,
    refill_guard: Duration,
    siblings: usize,
) {
    let (private, space, db, client) = setup(tag).await;
    let mut redis = connection_to(&private, 0).await;
    let mut settings = test_settings(&db.url, &private.url(), space.rules());
    settings.refill_guard = refill_guard;
    let daemon = start_daemon(settings, &db).await;
    let key = space.key("report:1:2:h");
    // Of a report no change names: in sweep mode a refill guard sweeps its patterns once more
    // after the guard, deleting what was written under them meanwhile.
    let decoy = space.key("report:99:2:h");
    let siblings: Vec<String> = (0..siblings)
        .map(|n| space.key(&format!("report:1:s{n}:h")))
        .collect();
    let mut written = vec![key.clone(), decoy.clone()];
    written.extend(siblings.iter().cloned());
    for round in 0..3 {
        // Past the refill guard of the previous changes (the reports' inserts included), which
        // would delete the keys as they are written.
        tokio::time::sleep(refill_guard).await;
        set_keys(&mut redis, &written).await;
        let mut admin = connection_to(&private, 0).await;
        run(
            &mut admin,
            redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("WRITE"),
        )
        .await;
        touch_report(&client, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refill = tokio::spawn({
            let mut app = connection_to(&private, 0).await;
            let key = key.clone();
            async move { set_keys(&mut app, &[key]).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        run(&mut admin, redis::cmd("CLIENT").arg("UNPAUSE")).await;
        refill.await.expect("refill");
        assert!(
            wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
            "round {round}: the change is done"
        );
        assert_gone_within(&mut redis, &siblings, PATIENCE).await;
        touch_report(&client, 1).await;
        assert_gone_within(&mut redis, std::slice::from_ref(&key), PATIENCE).await;
        assert_kept(&mut redis, std::slice::from_ref(&decoy)).await;
    }
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test]
async fn a_refill_coalesced_with_the_daemons_delete_is_cleared_by_the_next_change() {
    refill_coalesced_with_the_daemons_delete("fid_coalesce", Duration::ZERO, 0).await;
}

/// The refilled key shares its existence check with the change's other keys, all gone but it.
#[tokio::test]
async fn a_refill_coalesced_with_the_deletes_of_many_keys_is_cleared_by_the_next_change() {
    refill_coalesced_with_the_daemons_delete("fid_coalesce_n", Duration::ZERO, 200).await;
}

#[tokio::test]
async fn a_refill_coalesced_with_the_daemons_delete_is_cleared_under_a_refill_guard() {
    refill_coalesced_with_the_daemons_delete("fid_coalesce_g", Duration::from_secs(2), 0).await;
}

/// Keys that enter the database by `SWAPDB` (announced by no Redis) are found by the next change;
/// so are keys that were swapped out and back while an announcement of them was checked.
#[tokio::test]
async fn keys_swapped_into_the_database_are_cleared() {
    let (private, space, db, client) = setup("fid_swap").await;
    let mut db0 = connection_to(&private, 0).await;
    let mut db1 = connection_to(&private, 1).await;
    let daemon = start_daemon(test_settings(&db.url, &private.url(), space.rules()), &db).await;
    let key = space.key("report:1:2:h");
    let decoy = space.key("report:2:2:h");

    // Warmed in another database and swapped in.
    set_keys(&mut db1, &[key.clone(), decoy.clone()]).await;
    run(&mut db0, redis::cmd("SWAPDB").arg(0).arg(1)).await;
    touch_report(&client, 1).await;
    assert_gone_within(&mut db0, std::slice::from_ref(&key), PATIENCE).await;
    assert_kept(&mut db0, std::slice::from_ref(&decoy)).await;

    // Swapped out, written there (announced: tracking does not tell databases apart, so the
    // check runs against the database swapped in), then swapped back.
    set_keys(&mut db0, std::slice::from_ref(&key)).await;
    run(&mut db0, redis::cmd("SWAPDB").arg(0).arg(1)).await;
    set_keys(&mut db1, std::slice::from_ref(&key)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    run(&mut db0, redis::cmd("SWAPDB").arg(0).arg(1)).await;
    touch_report(&client, 1).await;
    assert_gone_within(&mut db0, std::slice::from_ref(&key), PATIENCE).await;
    if !matches!(test_mode(), Mode::Sweep) {
        // Seeded again, and answering from the index.
        daemon.wait_index_complete().await;
        set_keys(&mut db0, std::slice::from_ref(&key)).await;
        touch_report(&client, 1).await;
        assert_gone_within(&mut db0, std::slice::from_ref(&key), PATIENCE).await;
    }
    daemon.stop().await;
    db.drop().await;
}

/// splitmix64: a seeded generator small enough to read, so a failing run replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The cache keys the randomized test writes: pages of each report per user, and users' lists.
fn universe(space: &KeyPrefix) -> Vec<String> {
    let mut keys = Vec::new();
    for id in 1..=REPORTS {
        for user in 1..=USERS {
            keys.push(space.key(&format!("report:{id}:{user}:h")));
        }
    }
    for user in 1..=USERS {
        keys.push(space.key(&format!("reportlist:reports:{user}:p")));
    }
    keys
}

/// A change the randomized test commits, and whether a key is under its patterns.
#[derive(Debug, Clone, Copy)]
enum Change {
    /// An UPDATE of a report (author 1): `report:{id}:*`, `reportlist:reports:1:*`.
    Update(i32),
    /// `cache_invalidator.invalidate_report(id)`: `report:{id}:*`.
    Report(i32),
    /// `cache_invalidator.invalidate_user(user)`: `report:*:{user}:*`, `reportlist:*:{user}:*`.
    User(u32),
}

impl Change {
    fn covers(self, space: &KeyPrefix, key: &str) -> bool {
        let Some(logical) = key.strip_prefix(&space.key("")) else {
            return false;
        };
        let parts: Vec<&str> = logical.split(':').collect();
        match (self, parts.as_slice()) {
            (Change::Update(id) | Change::Report(id), ["report", report, ..]) => {
                *report == id.to_string()
            }
            (Change::Update(_), ["reportlist", "reports", author, ..]) => *author == "1",
            (Change::User(user), ["report", _, owner, ..]) => *owner == user.to_string(),
            (Change::User(user), ["reportlist", _, owner, ..]) => *owner == user.to_string(),
            _ => false,
        }
    }

    async fn commit(self, client: &tokio_postgres::Client) {
        match self {
            Change::Update(id) => touch_report(client, id).await,
            Change::Report(id) => {
                client
                    .execute(
                        "SELECT cache_invalidator.invalidate_report($1::bigint)",
                        &[&i64::from(id)],
                    )
                    .await
                    .expect("invalidate_report");
            }
            Change::User(user) => {
                client
                    .execute(
                        "SELECT cache_invalidator.invalidate_user($1::bigint)",
                        &[&i64::from(user)],
                    )
                    .await
                    .expect("invalidate_user");
            }
        }
    }
}

/// The kinds of the randomized test's writes, as its failure message names them.
const KINDS: [&str; 14] = [
    "SET",
    "SET EX",
    "SET PX 30",
    "RENAME",
    "MOVE to db 1",
    "MOVE from db 1",
    "COPY",
    "COPY from db 1",
    "DUMP+RESTORE",
    "MULTI SET DEL SET EXEC",
    "EVAL SET UNLINK",
    "SWAPDB 0 1",
    "FLUSHDB of db 2",
    "evictions",
];

/// The clients of the randomized test: database 0 (tracked), 1 (swapped with it) and 2 (flushed).
struct Writers {
    db0: MultiplexedConnection,
    db1: MultiplexedConnection,
    db2: MultiplexedConnection,
    keys: Vec<String>,
}

impl Writers {
    /// One random write of another client, named for the failure message.
    async fn random_write(&mut self, rng: &mut Rng) -> String {
        let k = self.keys[rng.below(self.keys.len() as u64) as usize].clone();
        let k2 = self.keys[rng.below(self.keys.len() as u64) as usize].clone();
        let kind = rng.below(KINDS.len() as u64) as usize;
        let (k, k2) = (k.as_str(), k2.as_str());
        let cmd = |name: &str, args: &[&str]| {
            let mut command = redis::cmd(name);
            for arg in args {
                command.arg(*arg);
            }
            command
        };
        // Each kind: commands sent in order, on database 0, 1 or 2.
        let commands: Vec<(usize, redis::Cmd)> = match kind {
            0 => vec![(0, cmd("SET", &[k, "v"]))],
            1 => vec![(0, cmd("SET", &[k, "v", "EX", "600"]))],
            2 => vec![(0, cmd("SET", &[k, "v", "PX", "30"]))],
            3 => vec![(0, cmd("RENAME", &[k, k2]))],
            4 => vec![(0, cmd("MOVE", &[k, "1"]))],
            5 => vec![(1, cmd("MOVE", &[k, "0"]))],
            6 => vec![(0, cmd("COPY", &[k, k2, "REPLACE"]))],
            7 => vec![(1, cmd("COPY", &[k, k2, "DB", "0", "REPLACE"]))],
            8 => {
                let dump: Option<Vec<u8>> = attempt(&mut self.db0, &mut cmd("DUMP", &[k]))
                    .await
                    .and_then(|value| redis::from_redis_value(value).ok())
                    .flatten();
                dump.map(|payload| {
                    let mut restore = cmd("RESTORE", &[k2, "0"]);
                    restore.arg(payload).arg("REPLACE");
                    (0, restore)
                })
                .into_iter()
                .collect()
            }
            9 => vec![
                (0, cmd("MULTI", &[])),
                (0, cmd("SET", &[k, "v"])),
                (0, cmd("DEL", &[k2])),
                (0, cmd("SET", &[k2, "w"])),
                (0, cmd("EXEC", &[])),
            ],
            10 => vec![(
                0,
                cmd(
                    "EVAL",
                    &[
                        "redis.call('SET', KEYS[1], 'v'); return redis.call('UNLINK', KEYS[2])",
                        "2",
                        k,
                        k2,
                    ],
                ),
            )],
            11 => vec![(0, cmd("SWAPDB", &["0", "1"]))],
            12 => vec![(2, cmd("SET", &[k, "v"])), (2, cmd("FLUSHDB", &[]))],
            _ => {
                self.evict(rng).await;
                Vec::new()
            }
        };
        for (db, mut command) in commands {
            let connection = [&mut self.db0, &mut self.db1, &mut self.db2];
            if let Some(connection) = connection.into_iter().nth(db) {
                attempt(connection, &mut command).await;
            }
        }
        format!("{} {k} {k2}", KINDS[kind])
    }

    /// Fills the server past a `maxmemory` just under its use: `allkeys-random` evicts keys.
    async fn evict(&mut self, rng: &mut Rng) {
        let used: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.db0)
            .await
            .expect("info");
        let used: u64 = used
            .lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .and_then(|value| value.trim().parse().ok())
            .expect("used_memory");
        run(
            &mut self.db0,
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory-policy")
                .arg("allkeys-random"),
        )
        .await;
        run(
            &mut self.db0,
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("maxmemory")
                .arg(used + 20_000),
        )
        .await;
        for _ in 0..(1 + rng.below(3)) {
            // Writes that need memory: evictions make room (or the write is refused: OOM).
            let _: redis::RedisResult<()> = redis::cmd("SET")
                .arg(format!("filler:{}", rng.next()))
                .arg(vec![b'x'; 30_000])
                .query_async(&mut self.db1)
                .await;
        }
        run(
            &mut self.db0,
            redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg(0),
        )
        .await;
    }
}

/// Random writes of other clients, then a change, whose keys present at its commit must all be
/// gone within seconds, while other writes go on outside its patterns.
#[tokio::test]
async fn random_writes_of_other_clients_leave_no_key_of_a_change_behind() {
    const ROUNDS: u32 = 300;
    let seed = std::env::var("KEY_FIDELITY_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |now| now.as_nanos() as u64)
        });
    println!("KEY_FIDELITY_SEED={seed} (set it to replay this run)");
    let mut rng = Rng(seed);
    let (private, space, db, client) = setup("fid_random").await;
    let mut writers = Writers {
        db0: connection_to(&private, 0).await,
        db1: connection_to(&private, 1).await,
        db2: connection_to(&private, 2).await,
        keys: universe(&space),
    };
    set_keys(&mut writers.db0, &writers.keys.clone()).await;
    set_keys(&mut writers.db1, &writers.keys.clone()).await;
    let daemon = start_daemon(test_settings(&db.url, &private.url(), space.rules()), &db).await;
    let started = Instant::now();
    for round in 0..ROUNDS {
        let mut history = Vec::new();
        for _ in 0..(1 + rng.below(6)) {
            history.push(writers.random_write(&mut rng).await);
        }
        let change = match rng.below(4) {
            0 => Change::Report(1 + rng.below(REPORTS as u64) as i32),
            1 => Change::User(1 + rng.below(USERS as u64) as u32),
            _ => Change::Update(1 + rng.below(REPORTS as u64) as i32),
        };
        let mut present = Vec::new();
        for key in writers.keys.iter().filter(|key| change.covers(&space, key)) {
            if exists(&mut writers.db0, key).await {
                present.push(key.clone());
            }
        }
        change.commit(&client).await;
        // Writes go on outside the change's patterns while the daemon clears it.
        let others: Vec<String> = writers
            .keys
            .iter()
            .filter(|key| !change.covers(&space, key))
            .cloned()
            .collect();
        for _ in 0..rng.below(8) {
            let key = &others[rng.below(others.len() as u64) as usize];
            run(&mut writers.db0, redis::cmd("SET").arg(key).arg("v")).await;
        }
        let left = survivors_after(&mut writers.db0, &present, Duration::from_secs(10)).await;
        if !left.is_empty() {
            panic!("KEY_FIDELITY_SEED={seed} round {round}: {change:?} left {left:?} (writes before it: {history:?})");
        }
    }
    println!("{ROUNDS} rounds in {:?}", started.elapsed());
    daemon.stop().await;
    db.drop().await;
}
