//! Private RabbitMQ and Redis servers for fault tests that stop, crash, restart or reconfigure
//! them, so they never disturb the shared servers other tests run against. Each runs as a child
//! process on free ports with a temporary data dir, and is killed (its dir removed) on drop.
//! `stop` is an operator's clean shutdown; `kill` is a crash (SIGKILL, nothing flushed or closed).
//! Either can listen with TLS only ([`RabbitMq::start_tls`], [`Redis::start_tls`]), on a
//! certificate from a [`super::certs::TestCa`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::certs::{ServerCert, TestCa};
use super::wait_until;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-{kind}-{}", super::unique_prefix()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// The directory of RabbitMQ's real scripts (Debian's /usr/sbin wrappers switch users).
fn rabbit_sbin() -> PathBuf {
    let link = Path::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
    let real = std::fs::canonicalize(link).unwrap_or_else(|_| {
        panic!("{} not found: run the suite with scripts/test.sh, which installs rabbitmq-server", link.display())
    });
    real.parent().expect("sbin").to_owned()
}

pub struct RabbitMq {
    dir: PathBuf,
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    node: String,
    /// The port of the TLS listener, when it has one.
    tls_port: Option<u16>,
    child: Option<Child>,
}

impl RabbitMq {
    /// Starts a node; `consumer_timeout` lowers RabbitMQ's delivery acknowledgement timeout, which
    /// it then checks every second.
    pub async fn start(consumer_timeout: Option<Duration>) -> Self {
        Self::start_with(consumer_timeout, None).await
    }

    /// Starts a node that also listens with TLS 1.3 (only) on a certificate `ca` signs; connect
    /// with [`Self::tls_url`].
    pub async fn start_tls(ca: &TestCa) -> Self {
        let server = ca.server("rabbitmq");
        Self::start_with(None, Some((ca.ca_file(), server))).await
    }

    async fn start_with(consumer_timeout: Option<Duration>, tls: Option<(PathBuf, ServerCert)>) -> Self {
        let dir = temp_dir("rabbitmq");
        for d in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::write(dir.join("plugins"), "[].").unwrap();
        std::fs::write(dir.join("advanced.config"), "[{rabbit, [{channel_tick_interval, 1000}]}].").unwrap();
        let mut conf = String::from("loopback_users = none\nlog.console = true\nlog.file = false\n");
        if let Some(t) = consumer_timeout {
            conf.push_str(&format!("consumer_timeout = {}\n", t.as_millis()));
        }
        let tls_port = tls.as_ref().map(|_| free_port());
        if let (Some(port), Some((ca, server))) = (tls_port, &tls) {
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.versions.1 = tlsv1.3\nssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                ca.display(),
                server.cert.display(),
                server.key.display()
            ));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).unwrap();
        let node = format!("kiln-{}@localhost", super::unique_prefix());
        let mut me = Self {
            dir,
            port: free_port(),
            dist_port: free_port(),
            epmd_port: free_port(),
            node,
            tls_port,
            child: None,
        };
        me.launch().await;
        me
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The `amqps://` URL of the TLS listener (a node from [`Self::start_tls`]).
    pub fn tls_url(&self) -> String {
        let port = self.tls_port.expect("a node started with start_tls");
        format!("amqps://guest:guest@127.0.0.1:{port}/%2f")
    }

    fn command(&self, program: &str) -> Command {
        Command::from(self.std_command(program))
    }

    fn std_command(&self, program: &str) -> std::process::Command {
        let sbin = rabbit_sbin();
        let mut cmd = std::process::Command::new(sbin.join(program));
        let path = format!("{}:{}", sbin.display(), std::env::var("PATH").unwrap_or_default());
        cmd.env("PATH", path)
            .env("HOME", self.dir.join("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.dir.join("log"))
            .env("RABBITMQ_PID_FILE", self.dir.join("rabbit.pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", self.dir.join("plugins"))
            .env("RABBITMQ_CONFIG_FILE", self.dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", self.dir.join("advanced.config"))
            // Crash dumps land in the node's own folder, removed with it.
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        cmd
    }

    async fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.join("log").join("stdout.log")).unwrap();
        let child = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start rabbitmq-server");
        self.child = Some(child);
        let status = self
            .command("rabbitmqctl")
            .args(["-n", &self.node, "wait"])
            .arg(self.dir.join("rabbit.pid"))
            .args(["--timeout", "120"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .expect("rabbitmqctl wait");
        assert!(status.success(), "RabbitMQ did not start; see {}", self.dir.join("log/stdout.log").display());
    }

    /// Stops the node (as an operator would) and waits until it no longer accepts connections.
    pub async fn stop(&mut self) {
        let _ = self
            .command("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(60), child.wait()).await;
            let _ = child.start_kill();
        }
        self.wait_closed().await;
    }

    /// Crashes the node: SIGKILL to the Erlang VM (the OS process in the pid file; the script
    /// that started it is only its parent), then waits until the port is closed. Confirmed
    /// messages of quorum queues survive; everything in flight on connections is cut.
    pub async fn kill(&mut self) {
        let pid_file = self.dir.join("rabbit.pid");
        let pid = std::fs::read_to_string(&pid_file).expect("RabbitMQ's pid file").trim().to_owned();
        let killed = Command::new("kill").args(["-KILL", &pid]).status().await.expect("run kill");
        assert!(killed.success(), "kill -KILL {pid} (RabbitMQ's VM)");
        if let Some(mut child) = self.child.take() {
            let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            assert!(exited.is_ok(), "the rabbitmq-server script did not exit after its VM was killed");
        }
        // A stale pid file would answer the next start's `rabbitmqctl wait` for the dead VM.
        let _ = std::fs::remove_file(&pid_file);
        self.wait_closed().await;
    }

    async fn wait_closed(&self) {
        let port = self.port;
        wait_until("RabbitMQ stops listening", Duration::from_secs(30), || async move {
            match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                Err(_) => Ok(()),
                Ok(_) => Err("still accepting connections"),
            }
        })
        .await;
    }

    /// Starts the node again on the same ports and data.
    pub async fn restart(&mut self) {
        self.launch().await;
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The Erlang VM is a grandchild of the script: killing the script would leave the node
            // running, so stop the node itself (a second or two), then make sure of the script.
            let _ = self
                .std_command("rabbitmqctl")
                .args(["-n", &self.node, "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = child.start_kill();
        }
        let _ = std::process::Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string(), "-kill"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// When Redis fsyncs its append-only file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// After every write (`appendfsync always`): nothing acknowledged is ever lost.
    Always,
    /// Once a second (`appendfsync everysec`), the production setting: an OS crash loses up to
    /// about a second of writes. (A killed process loses nothing it already wrote to the file,
    /// which the kernel holds.)
    EverySec,
}

impl Fsync {
    fn arg(self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::EverySec => "everysec",
        }
    }
}

/// A point in Redis's append-only file: what an fsync at that moment would have made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AofMark {
    file: PathBuf,
    len: u64,
}

pub struct Redis {
    dir: PathBuf,
    port: u16,
    fsync: Fsync,
    /// The CA file and the server's certificate when it listens with TLS only.
    tls: Option<(PathBuf, ServerCert)>,
    child: Option<Child>,
}

impl Redis {
    /// Starts a durable Redis: append-only file, fsync on every write.
    pub async fn start() -> Self {
        Self::start_with(Fsync::Always).await
    }

    /// Starts Redis with an append-only file fsynced as `fsync` says.
    pub async fn start_with(fsync: Fsync) -> Self {
        let mut me = Self { dir: temp_dir("redis"), port: free_port(), fsync, tls: None, child: None };
        me.launch().await;
        me
    }

    /// Starts a durable Redis that listens with TLS only (no plain port), on a certificate `ca`
    /// signs; [`Self::url`] is then a `rediss://` URL.
    pub async fn start_tls(ca: &TestCa) -> Self {
        let tls = Some((ca.ca_file(), ca.server("redis")));
        let mut me = Self { dir: temp_dir("redis"), port: free_port(), fsync: Fsync::Always, tls, child: None };
        me.launch().await;
        me
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "rediss" } else { "redis" };
        format!("{scheme}://127.0.0.1:{}/", self.port)
    }

    /// A client of this server, trusting the test CA when it listens with TLS.
    fn client(&self) -> Result<redis::Client, String> {
        let tls =
            crate::tls::ClientTls::load(self.tls.as_ref().map(|(ca, _)| ca.as_path())).map_err(|e| e.to_string())?;
        tls.redis_client(&self.url()).map_err(|e| e.to_string())
    }

    async fn launch(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((ca, server)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string(), "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&server.cert)
                .arg("--tls-key-file")
                .arg(&server.key)
                .arg("--tls-ca-cert-file")
                .arg(ca),
        };
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            // No rewrites, so an `AofMark` stays a position in the file being appended to.
            .args(["--auto-aof-rewrite-percentage", "0"])
            .args(["--appendfsync", self.fsync.arg(), "--dir"])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (run the suite with scripts/test.sh, which installs it)");
        self.child = Some(child);
        let client = self.client();
        wait_until("Redis answers PING", Duration::from_secs(30), || {
            let client = client.clone();
            async move {
                let client = client?;
                let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
                redis::cmd("PING").query_async::<String>(&mut conn).await.map_err(|e| e.to_string())
            }
        })
        .await;
    }

    /// Shuts Redis down cleanly (the append-only file is complete) and waits for the process.
    pub async fn stop(&mut self) {
        if let Ok(client) = self.client()
            && let Ok(mut conn) = client.get_multiplexed_async_connection().await
        {
            let _ = redis::cmd("SHUTDOWN").query_async::<()>(&mut conn).await;
        }
        if let Some(mut child) = self.child.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            let _ = child.start_kill();
        }
    }

    /// Crashes Redis: SIGKILL, then waits for the process. What it had not written to its
    /// append-only file is gone; the next start replays the file.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().expect("SIGKILL redis-server");
            let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
            assert!(exited.is_ok(), "redis-server did not exit after SIGKILL");
        }
    }

    /// Where the append-only file ends now.
    pub fn aof_mark(&self) -> AofMark {
        let dir = self.dir.join("appendonlydir");
        let manifest = std::fs::read_to_string(dir.join("appendonly.aof.manifest")).expect("the AOF manifest");
        // The last incremental file is the one being appended to.
        let name = manifest
            .lines()
            .rev()
            .filter(|l| l.ends_with("type i"))
            .find_map(|l| l.split_whitespace().nth(1))
            .expect("an incremental AOF file")
            .to_owned();
        let file = dir.join(name);
        let len = std::fs::metadata(&file).expect("the AOF file").len();
        AofMark { file, len }
    }

    /// Crashes Redis as a crash of its machine would under `appendfsync everysec`: SIGKILL, and the
    /// append-only file cut back to `mark`, its last fsync — every write since is gone. (A killed
    /// process alone loses nothing: the kernel holds what it wrote.)
    pub async fn crash_back_to(&mut self, mark: &AofMark) {
        self.kill().await;
        let now = self.aof_mark();
        assert_eq!(now.file, mark.file, "the append-only file was rewritten since the mark");
        assert!(now.len >= mark.len, "the append-only file shrank: {now:?} < {mark:?}");
        let file = std::fs::OpenOptions::new().write(true).open(&mark.file).expect("open the AOF");
        file.set_len(mark.len).expect("cut the AOF back to the mark");
    }

    /// Starts Redis again on the same port and data (after `stop` or `kill`).
    pub async fn restart(&mut self) {
        self.launch().await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
