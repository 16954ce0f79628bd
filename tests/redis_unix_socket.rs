//! Redis over a Unix socket (`unix:///path`, `redis+unix:///path`): the daemon clears the keys
//! a committed change names on a private `redis-server --unixsocket`, as the systemd unit (which
//! allows `AF_UNIX`) and the README promise.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_clears_keys_through_a_unix_socket() {
    let socket_dir = tempfile::tempdir().expect("temp dir");
    let socket = socket_dir.path().join("redis.sock");
    let socket_text = socket.to_str().expect("utf-8 path").to_owned();
    // The TCP port stays open only for the harness's readiness check and the test's own client.
    let redis_server =
        PrivateRedis::start_with(&["--unixsocket", &socket_text, "--unixsocketperm", "700"]);
    let mut redis = redis_connection(&redis_server.url()).await;

    for (round, scheme) in ["unix", "redis+unix"].into_iter().enumerate() {
        let (space, db) = space_with_reports("unix_socket").await;
        let cleared = space.keys(&["report:1:1:h", "reportlist:reports:1:h"]);
        let kept = space.keys(&["report:2:1:h", "reportlist:reports:2:h"]);
        set_keys(&mut redis, &[cleared.clone(), kept.clone()].concat()).await;

        let url = format!("{scheme}://{socket_text}?db=0");
        let daemon = Daemon::start(test_settings(&db.url, &url, space.rules()));
        commit_report(&db.client().await, 1, 1).await;
        assert_gone_within(&mut redis, &cleared, PATIENCE).await;
        assert!(
            wait_until(PATIENCE, || async { db.outbox_rows().await == 0 }).await,
            "round {round} ({scheme}://): the outbox was not acknowledged"
        );
        assert_kept(&mut redis, &kept).await;
        daemon.stop().await;
        db.drop().await;
    }
}
