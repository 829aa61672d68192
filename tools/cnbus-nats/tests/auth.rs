//! The credentials and TLS options of the sink that need more than `--user`/`--auth` against a
//! real nats-server: NKey users, `.creds` files (operator/JWT mode, the JWTs made here with
//! `nkeys`) and client certificates (mutual TLS, the certificates in tests/tls). Each delivers
//! (records acknowledged and read back from the stream), and each wrong or damaged credential
//! is a clear [`SinkError`] at start, never a silent loss; the secret (an NKey seed) never
//! shows in the error's text or `Debug`, nor in the configuration's `Debug`.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::ConnectOptions;
use cnbus_nats::{Auth, Config, NatsSink, SinkError};
use common::*;
use nkeys::KeyPair;

/// Starts the sink with `config`, publishes `n` records, shuts down and checks that all of
/// them were acknowledged and are in the stream once and unchanged (read back with `read`).
fn delivers(config: Config, read: ConnectOptions, n: usize) {
    let url = config.url.clone();
    let sink = NatsSink::start(config).expect("the right credentials start the sink");
    assert!(sink.stats().connected);
    publish(&sink, 0..n);
    let report = sink.shutdown(DEADLINE);
    assert_eq!(
        (report.sent, report.unsent, report.dropped),
        (n as u64, 0, 0)
    );
    let stored = by_id(&read_stream_with(read, &url, "CNBUS_EVENTS"));
    assert_eq!(stored.len(), n);
    for i in 0..n {
        let s = &stored[&msg_id(i)];
        assert_eq!(s.payload, line(i));
        assert_eq!(s.subject, "cnbus.events.h.fork");
    }
}

/// The error `start` gives for `config` (it must not start).
fn start_error(config: &Config) -> SinkError {
    match NatsSink::start(config.clone()) {
        Ok(sink) => panic!("the sink started with {config:?}: {:?}", sink.stats()),
        Err(e) => e,
    }
}

/// No 12-character piece of `secret` shows in `texts`.
fn assert_hidden(secret: &str, texts: &[String]) {
    let chars: Vec<char> = secret.chars().collect();
    for piece in chars.windows(12) {
        let piece: String = piece.iter().collect();
        for text in texts {
            assert!(!text.contains(&piece), "the secret shows in {text}");
        }
    }
}

/// The error's text and Debug, and the configuration's Debug, hide `secret`.
fn assert_error_hides(secret: &str, error: &SinkError, config: &Config) {
    assert_hidden(
        secret,
        &[
            error.to_string(),
            format!("{error:?}"),
            format!("{config:?}"),
        ],
    );
}

/// The same string with one base32 character changed (an NKey seed whose checksum fails).
fn damaged(seed: &str) -> String {
    let mut chars: Vec<char> = seed.chars().collect();
    let at = chars.len() / 2;
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    chars.into_iter().collect()
}

/// Writes a nats-server configuration file into `dir`; its path, for `-c`.
fn server_config(dir: &Path, text: &str) -> String {
    let path = dir.join("server.conf");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------------
// NKey users.

/// A server whose only user is the NKey `user` (`authorization { users = [ { nkey } ] }`).
fn nkey_server(conf_dir: &Path, user: &KeyPair) -> NatsServer {
    let conf = server_config(
        conf_dir,
        &format!(
            "authorization {{ users = [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    );
    NatsServer::start(&["-c", &conf])
}

#[test]
fn an_nkey_user_delivers_and_a_wrong_or_damaged_seed_is_a_clear_error_at_start() {
    let user = KeyPair::new_user();
    let seed = user.seed().unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    let server = nkey_server(conf_dir.path(), &user);
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    // No credentials.
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    // The seed of another user.
    let stranger = KeyPair::new_user().seed().unwrap();
    config.auth = Auth::NKey(stranger.clone());
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    assert!(
        error.to_string().contains("refused the credentials")
            && error.to_string().to_lowercase().contains("authorization"),
        "{error}"
    );
    assert_error_hides(&stranger, &error, &config);
    // The right seed, damaged (its checksum fails), and the user's public key instead of its
    // seed: not seeds at all, said so (async-nats alone reports "failed signing nonce").
    let bad = damaged(&seed);
    for (what, value) in [("damaged", bad.clone()), ("public key", user.public_key())] {
        config.auth = Auth::NKey(value.clone());
        let error = start_error(&config);
        assert!(
            matches!(error, SinkError::Config(_))
                && error.to_string().contains("NKey seed is not a valid seed"),
            "{what}: {error:?}"
        );
        assert_error_hides(&value, &error, &config);
        assert_error_hides(&seed, &error, &config);
    }
    // The right seed.
    config.auth = Auth::NKey(seed.clone());
    assert_hidden(&seed, &[format!("{config:?}")]);
    delivers(config, ConnectOptions::with_nkey(seed), 50);
}

#[test]
fn a_wrong_nkey_found_after_an_unreachable_start_keeps_records_spooled_and_says_why() {
    let user = KeyPair::new_user();
    let conf_dir = tempfile::tempdir().unwrap();
    let mut server = nkey_server(conf_dir.path(), &user);
    server.kill();
    let spool = tempfile::tempdir().unwrap();
    let mut config = Config::new(server.url(), "h", spool.path());
    let stranger = KeyPair::new_user().seed().unwrap();
    config.auth = Auth::NKey(stranger.clone());
    let sink = NatsSink::start(config).expect("an unreachable server is not an error at start");
    publish(&sink, 0..20);
    server.restart();
    assert_hidden(&stranger, &refused_after_an_unreachable_start(sink, 20));
}

// ---------------------------------------------------------------------------------------------
// `.creds` files: operator mode, with the JWTs `nsc` would write, made here.

/// base64url without padding, as JWTs use.
fn b64(bytes: &[u8]) -> String {
    data_encoding::BASE64URL_NOPAD.encode(bytes)
}

/// A NATS JWT (`alg: ed25519-nkey`) of `subject`, signed by `issuer`, with the claims `nats`.
fn jwt(issuer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        // Unique per JWT (nsc puts a hash of the claims here; the server does not check it).
        "jti": format!("CNBUSTEST{}{}", now, NEXT.fetch_add(1, Ordering::Relaxed)),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#),
        b64(claims.to_string().as_bytes())
    );
    let signature = issuer.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&signature))
}

/// The JWT of `account`, issued by `operator`, without limits, with JetStream if `js` (the
/// system account may not have it).
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, js: bool) -> String {
    let storage = if js { -1 } else { 0 };
    jwt(
        operator,
        &account.public_key(),
        name,
        serde_json::json!({
            "limits": {
                "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                "wildcards": true, "conn": -1, "leaf": -1,
                "mem_storage": storage, "disk_storage": storage,
                "streams": -1, "consumer": -1,
            },
            "default_permissions": { "pub": {}, "sub": {} },
            "type": "account",
            "version": 2,
        }),
    )
}

/// The JWT of `user`, issued by `account`.
fn user_jwt(account: &KeyPair, user: &KeyPair) -> String {
    jwt(
        account,
        &user.public_key(),
        "cnbus-agent",
        serde_json::json!({
            "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
            "type": "user", "version": 2,
        }),
    )
}

/// A `.creds` file's text, as `nsc generate creds` writes it.
fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// An operator-mode server with one account of its own, a directory for creds files and a
/// spool (the temporary directories live as long as this).
struct OperatorMode {
    account: KeyPair,
    server: NatsServer,
    dir: tempfile::TempDir,
    spool: tempfile::TempDir,
    _conf: tempfile::TempDir,
}

impl OperatorMode {
    fn start() -> OperatorMode {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let conf = tempfile::tempdir().unwrap();
        let server = operator_server(conf.path(), &operator, &account);
        OperatorMode {
            account,
            server,
            dir: tempfile::tempdir().unwrap(),
            spool: tempfile::tempdir().unwrap(),
            _conf: conf,
        }
    }
}

/// A server in operator mode (memory resolver) knowing a system account and `account`, with
/// JetStream.
fn operator_server(conf_dir: &Path, operator: &KeyPair, account: &KeyPair) -> NatsServer {
    let system = KeyPair::new_account();
    let operator_jwt = jwt(
        operator,
        &operator.public_key(),
        "cnbus-test-operator",
        serde_json::json!({
            "system_account": system.public_key(),
            "type": "operator",
            "version": 2,
        }),
    );
    let conf = server_config(
        conf_dir,
        &format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {sys_jwt}\n  {acc}: {acc_jwt}\n}}\n",
            sys = system.public_key(),
            sys_jwt = account_jwt(operator, &system, "SYS", false),
            acc = account.public_key(),
            acc_jwt = account_jwt(operator, account, "CNBUS", true),
        ),
    );
    NatsServer::start(&["-c", &conf])
}

#[test]
fn a_creds_file_delivers_and_creds_of_another_account_or_key_are_a_clear_error_at_start() {
    let op = OperatorMode::start();
    let mut config = Config::new(op.server.url(), "h", op.spool.path());
    // No credentials.
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    // A user of an account this server does not know (no JWT of it in the resolver).
    let other_account = KeyPair::new_account();
    let other_user = KeyPair::new_user();
    let other_seed = other_user.seed().unwrap();
    let foreign = op.dir.path().join("foreign.creds");
    std::fs::write(
        &foreign,
        creds(&user_jwt(&other_account, &other_user), &other_seed),
    )
    .unwrap();
    config.auth = Auth::CredsFile(foreign);
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    assert!(
        error.to_string().contains("refused the credentials"),
        "{error}"
    );
    assert_error_hides(&other_seed, &error, &config);
    // The right JWT with the seed of another user (the nonce's signature does not match).
    let user = KeyPair::new_user();
    let seed = user.seed().unwrap();
    let user_jwt = user_jwt(&op.account, &user);
    let mismatched = op.dir.path().join("mismatched.creds");
    std::fs::write(&mismatched, creds(&user_jwt, &other_seed)).unwrap();
    config.auth = Auth::CredsFile(mismatched);
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    assert_error_hides(&other_seed, &error, &config);
    // The right user's JWT signed by another key than its account's (forged).
    let forged = op.dir.path().join("forged.creds");
    let signed = &user_jwt[..user_jwt.rfind('.').unwrap()];
    let forged_jwt = format!(
        "{signed}.{}",
        b64(&other_account.sign(signed.as_bytes()).unwrap())
    );
    std::fs::write(&forged, creds(&forged_jwt, &seed)).unwrap();
    config.auth = Auth::CredsFile(forged);
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Auth { .. }), "{error:?}");
    assert_error_hides(&seed, &error, &config);
    // The right creds file.
    let good = op.dir.path().join("agent.creds");
    std::fs::write(&good, creds(&user_jwt, &seed)).unwrap();
    config.auth = Auth::CredsFile(good.clone());
    assert_hidden(&seed, &[format!("{config:?}")]);
    let read = runtime()
        .block_on(ConnectOptions::with_credentials_file(&good))
        .unwrap();
    delivers(config, read, 50);
}

#[test]
fn a_damaged_or_missing_creds_file_is_a_clear_error_at_start() {
    let op = OperatorMode::start();
    let mut config = Config::new(op.server.url(), "h", op.spool.path());
    let user = KeyPair::new_user();
    let seed = user.seed().unwrap();
    let text = creds(&user_jwt(&op.account, &user), &seed);
    let cases: Vec<(&str, String)> = vec![
        // Cut in the middle of the seed block.
        (
            "truncated",
            text[..text.find(&seed).unwrap() + 20].to_owned(),
        ),
        // The seed's checksum fails.
        ("bad-seed", text.replace(&seed, &damaged(&seed))),
        // No JWT block.
        ("no-jwt", text[text.find("*****").unwrap()..].to_owned()),
        ("empty", String::new()),
    ];
    for (name, body) in cases {
        let path = op.dir.path().join(format!("{name}.creds"));
        std::fs::write(&path, &body).unwrap();
        config.auth = Auth::CredsFile(path.clone());
        let error = start_error(&config);
        let message = error.to_string();
        assert!(
            matches!(error, SinkError::Config(_)) && message.contains(path.to_str().unwrap()),
            "{name}: {error:?}"
        );
        assert_error_hides(&seed, &error, &config);
        assert_error_hides(&damaged(&seed), &error, &config);
    }
    config.auth = Auth::CredsFile(op.dir.path().join("absent.creds"));
    let error = start_error(&config);
    assert!(
        matches!(error, SinkError::Config(_)) && error.to_string().contains("absent.creds"),
        "{error:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS.

/// Test certificates: tests/tls/README.md says what each is and how it was made.
fn tls_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/tls")
        .join(name)
}

/// A server with TLS (tests/tls/server.pem) that verifies clients against
/// tests/tls/client-ca.pem.
fn mtls_server(conf_dir: &Path) -> NatsServer {
    let conf = server_config(
        conf_dir,
        &format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  ca_file: {:?}\n  verify: true\n}}\n",
            tls_file("server.pem"),
            tls_file("server.key"),
            tls_file("client-ca.pem"),
        ),
    );
    NatsServer::start(&["-c", &conf])
}

/// TLS with the test CA as root, no client certificate.
fn tls_config(server: &NatsServer, spool: &Path) -> Config {
    let mut config = Config::new(server.url(), "h", spool);
    config.tls_required = true;
    config.tls_root_ca = Some(tls_file("ca.pem"));
    config
}

#[test]
fn a_client_certificate_delivers_when_the_server_verifies_clients() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = mtls_server(conf_dir.path());
    let spool = tempfile::tempdir().unwrap();
    let mut config = tls_config(&server, spool.path());
    config.tls_client_cert = Some((tls_file("client.pem"), tls_file("client.key")));
    let read = ConnectOptions::new()
        .require_tls(true)
        .add_root_certificates(tls_file("ca.pem"))
        .add_client_certificate(tls_file("client.pem"), tls_file("client.key"));
    delivers(config, read, 50);
}

#[test]
fn no_or_an_untrusted_client_certificate_is_a_clear_error_at_start() {
    let conf_dir = tempfile::tempdir().unwrap();
    let server = mtls_server(conf_dir.path());
    let spool = tempfile::tempdir().unwrap();
    let mut config = tls_config(&server, spool.path());
    // No client certificate.
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Tls { .. }), "{error:?}");
    // A client certificate from a CA the server does not trust.
    config.tls_client_cert = Some((tls_file("stranger.pem"), tls_file("stranger.key")));
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Tls { .. }), "{error:?}");
    // The right certificate with another key.
    config.tls_client_cert = Some((tls_file("client.pem"), tls_file("stranger.key")));
    let error = start_error(&config);
    assert!(matches!(error, SinkError::Tls { .. }), "{error:?}");
    // Files that are not there: the error names the file.
    config.tls_client_cert = Some((tls_file("absent.pem"), tls_file("client.key")));
    let error = start_error(&config);
    assert!(
        matches!(error, SinkError::Tls { .. }) && error.to_string().contains("absent.pem"),
        "{error:?}"
    );
    config.tls_client_cert = Some((tls_file("client.pem"), tls_file("absent.key")));
    let error = start_error(&config);
    assert!(
        matches!(error, SinkError::Tls { .. }) && error.to_string().contains("absent.key"),
        "{error:?}"
    );
    config.tls_client_cert = Some((tls_file("client.pem"), tls_file("client.key")));
    config.tls_root_ca = Some(tls_file("absent-ca.pem"));
    let error = start_error(&config);
    assert!(
        matches!(error, SinkError::Tls { .. }) && error.to_string().contains("absent-ca.pem"),
        "{error:?}"
    );
}
