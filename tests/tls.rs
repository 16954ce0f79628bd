//! TLS on both sides: a private Postgres with `ssl=on` reached with
//! `sslmode=verify-full&sslrootcert=…`, and a private Redis that speaks only TLS (`--port 0`)
//! reached with `rediss://` and the CA file. The CA and the server certificate (for `localhost`
//! and `127.0.0.1`) are made by the test.

mod common;

use std::time::Duration;

use cache_invalidator::postgres::PgTarget;
use cache_invalidator::redis_nodes::RedisTarget;
use cache_invalidator::settings::SecretUrl;
use common::*;

fn verify_full_url(port: u16, database: &str, ca: &std::path::Path) -> String {
    format!(
        "postgres://postgres@localhost:{port}/{database}?sslmode=verify-full&sslrootcert={}",
        ca.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_works_over_verified_tls_to_postgres_and_redis_and_reconnects() {
    let certs = TestCerts::generate();
    let pg = PrivatePostgres::start_tls(&certs);
    let redis_server = PrivateRedis::start_tls(&certs);
    let space = KeyPrefix::new("tls");
    let db = TestDb::with_reports_on(&pg.url(), "tls", &space.rules()).await;
    let mut redis = tls_redis_connection(&redis_server.tls_url(), &certs.ca_pem()).await;
    let first = space.keys(&["report:12:1:h", "reportlist:reports:1:h"]);
    let second = space.keys(&["report:13:2:h", "reportlist:reports:2:h"]);
    let decoys = vec![space.key("report:123:1:h"), space.key_v2("report:12:1:h")];
    set_keys(
        &mut redis,
        &[first.clone(), second.clone(), decoys.clone()].concat(),
    )
    .await;

    let mut settings = test_settings(
        &verify_full_url(pg.port, &db.name, &certs.ca_file()),
        &redis_server.tls_url(),
        space.rules(),
    );
    settings.connections.redis_ca_file = Some(certs.ca_file());
    let daemon = Daemon::start(settings);
    let client = db.client().await;
    commit_report(&client, 12, 1).await;
    assert_gone_within(&mut redis, &first, PATIENCE).await;

    // Every session of the daemon is encrypted (plain connections would be allowed: the test's
    // own are plain).
    let (sessions, encrypted): (i64, i64) = {
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = current_database() AND a.application_name LIKE 'cache-invalidator%'",
                &[],
            )
            .await
            .expect("pg_stat_ssl");
        (row.get(0), row.get(1))
    };
    assert!(
        sessions >= 2,
        "expected LISTEN and claim sessions, saw {sessions}"
    );
    assert_eq!(encrypted, sessions, "a daemon session without TLS");

    // Reconnects go through TLS too.
    client
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name LIKE 'cache-invalidator%'",
        )
        .await
        .expect("terminate");
    commit_report(&client, 13, 2).await;
    assert_gone_within(&mut redis, &second, PATIENCE).await;
    assert_kept(&mut redis, &decoys).await;
    db.wait_for_empty_outbox(PATIENCE).await;
    daemon.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_whose_certificate_another_ca_signed_are_refused() {
    let certs = TestCerts::generate();
    let stranger = TestCerts::generate();
    let pg = PrivatePostgres::start_tls(&certs);
    let redis_server = PrivateRedis::start_tls(&certs);

    let trusted = PgTarget::parse(&verify_full_url(pg.port, "postgres", &certs.ca_file()))
        .expect("url")
        .with_default_application_name("tls test");
    assert!(
        trusted.connect(None).await.is_ok(),
        "the right CA must work"
    );
    let untrusted = PgTarget::parse(&verify_full_url(pg.port, "postgres", &stranger.ca_file()))
        .expect("url")
        .with_default_application_name("tls test");
    let Err(error) = untrusted.connect(None).await else {
        panic!("a certificate from an unknown CA must be refused");
    };
    assert!(error.to_string().contains("TLS"), "{error}");

    let timeout = Duration::from_secs(2);
    let url = SecretUrl::new(redis_server.tls_url());
    let trusted = RedisTarget::parse(url.expose(), Some(&certs.ca_file()), timeout).expect("url");
    assert!(trusted.connect().await.is_ok(), "the right CA must work");
    let untrusted =
        RedisTarget::parse(url.expose(), Some(&stranger.ca_file()), timeout).expect("url");
    assert!(
        untrusted.connect().await.is_err(),
        "a Redis certificate from an unknown CA must be refused"
    );
}
