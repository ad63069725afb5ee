//! The gateway over HTTPS, checked by real clients: `openssl s_client` (TLS 1.3 verifies against
//! the test CA, TLS 1.2 is refused unless `KILN_TLS_MIN_VERSION=1.2`), reqwest on rustls trusting
//! the test CA, and a certificate replaced on disk that new handshakes present without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use kiln_common::testing::certs::{ServerCert, TestCa};
use kiln_common::testing::{Kind, wait_until};
use kiln_gateway::GatewayConfig;
use kiln_gateway::config::{TlsConfig, TlsVersion};

use crate::harness::Env;

/// What `openssl s_client` made of a handshake: whether it succeeded (and verified: it is run
/// with `-verify_return_error`), and its output.
struct Handshake {
    ok: bool,
    output: String,
}

async fn s_client(addr: SocketAddr, ca: &Path, version: &str) -> Handshake {
    let out = tokio::process::Command::new("openssl")
        .args(["s_client", version, "-connect", &addr.to_string(), "-servername", "localhost"])
        .args(["-verify_return_error", "-verify_ip", "127.0.0.1", "-CAfile"])
        .arg(ca)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run openssl s_client");
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Handshake { ok: out.status.success(), output }
}

fn tls(cert: &ServerCert) -> TlsConfig {
    TlsConfig { tls_cert: Some(cert.cert.clone()), tls_key: Some(cert.key.clone()), ..TlsConfig::default() }
}

fn https_client(ca: &TestCa) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(ca.ca_pem().as_bytes()).expect("the test CA");
    kiln_common::tls::http_client().add_root_certificate(root).timeout(Duration::from_secs(10)).build().unwrap()
}

#[tokio::test]
async fn https_is_tls_1_3_only_and_verifies_with_the_ca() {
    let ca = TestCa::new("kiln test CA (gateway)");
    let cert = ca.server("gateway-tls13");
    let env = Env::new(Kind::Embedded);
    let gw = env.gateway_with(GatewayConfig { tls: tls(&cert), ..GatewayConfig::default() }).await;

    let modern = s_client(gw.addr, &ca.ca_file(), "-tls1_3").await;
    assert!(modern.ok, "TLS 1.3 handshake failed:\n{}", modern.output);
    assert!(modern.output.contains("Verify return code: 0 (ok)"), "not verified:\n{}", modern.output);
    assert!(modern.output.contains("TLSv1.3"), "not TLS 1.3:\n{}", modern.output);
    assert!(modern.output.contains("gateway-tls13"), "another certificate:\n{}", modern.output);

    let old = s_client(gw.addr, &ca.ca_file(), "-tls1_2").await;
    assert!(!old.ok, "TLS 1.2 was accepted:\n{}", old.output);

    let health = https_client(&ca).get(format!("https://127.0.0.1:{}/healthz", gw.addr.port())).send().await;
    let health = health.expect("GET /healthz over TLS");
    assert_eq!(health.status(), 200);
    // A plain-HTTP client gets no answer from the TLS port.
    let plain = env.http.get(format!("http://{}/healthz", gw.addr)).send().await;
    assert!(plain.is_err() || plain.as_ref().is_ok_and(|r| r.status() != 200), "plain HTTP was served: {plain:?}");

    let addr = gw.addr;
    gw.stop().await;
    wait_until("the port closes after shutdown", Duration::from_secs(10), || async move {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting"),
        }
    })
    .await;
}

#[tokio::test]
async fn tls_1_2_is_served_when_allowed() {
    let ca = TestCa::new("kiln test CA (gateway, 1.2)");
    let cert = ca.server("gateway-tls12");
    let env = Env::new(Kind::Embedded);
    let config = TlsConfig { tls_min_version: TlsVersion::V1_2, ..tls(&cert) };
    let gw = env.gateway_with(GatewayConfig { tls: config, ..GatewayConfig::default() }).await;
    let old = s_client(gw.addr, &ca.ca_file(), "-tls1_2").await;
    assert!(old.ok && old.output.contains("TLSv1.2"), "TLS 1.2 refused though allowed:\n{}", old.output);
    let modern = s_client(gw.addr, &ca.ca_file(), "-tls1_3").await;
    assert!(modern.ok, "TLS 1.3 refused:\n{}", modern.output);
    gw.stop().await;
}

#[tokio::test]
async fn a_replaced_certificate_is_presented_without_a_restart() {
    let ca = TestCa::new("kiln test CA (reload)");
    let live = ca.server("gateway-before");
    let env = Env::new(Kind::Embedded);
    let config = TlsConfig { tls_reload_every: Duration::from_millis(100), ..tls(&live) };
    let gw = env.gateway_with(GatewayConfig { tls: config, ..GatewayConfig::default() }).await;
    let before = s_client(gw.addr, &ca.ca_file(), "-tls1_3").await;
    assert!(before.ok && before.output.contains("gateway-before"), "{}", before.output);

    // As a certificate manager does: new files renamed over the old ones, the key first.
    let next = ca.server("gateway-after");
    for (from, to) in [(&next.key, &live.key), (&next.cert, &live.cert)] {
        let staged = to.with_extension("staged");
        std::fs::copy(from, &staged).unwrap();
        std::fs::rename(&staged, to).unwrap();
    }
    let (addr, ca_file) = (gw.addr, ca.ca_file());
    wait_until("new handshakes present the new certificate", Duration::from_secs(10), || {
        let ca_file = ca_file.clone();
        async move {
            let h = s_client(addr, &ca_file, "-tls1_3").await;
            if h.ok && h.output.contains("gateway-after") { Ok(()) } else { Err(h.output) }
        }
    })
    .await;
    let health = https_client(&ca).get(format!("https://127.0.0.1:{}/healthz", gw.addr.port())).send().await;
    assert_eq!(health.expect("GET /healthz after the reload").status(), 200);
    gw.stop().await;
}
