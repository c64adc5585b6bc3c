//! A private, throwaway PostgreSQL cluster started from the system's binaries.
//!
//! PostgreSQL refuses to run as root, so as root the server runs as the `postgres`
//! user through `runuser`; as a normal user it runs directly. It listens only on a
//! Unix socket inside its own temporary directory, so it never collides with another
//! server or another test process. A small watchdog process stops it and removes
//! its directory when the process that started it exits, even after a crash, so no
//! server outlives its owner.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// How the cluster should trade durability for speed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync off: for tests, where the data is thrown away anyway.
    Throwaway,
    /// PostgreSQL's defaults (fsync on, synchronous commit): for demos and benchmarks,
    /// so that the numbers they print mean something.
    Durable,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL server binaries found (tried `pg_config --bindir` and /usr/lib/postgresql/*/bin); install the PostgreSQL server package")]
    BinariesNotFound,
    #[error("running as root, but there is no `postgres` user to run the server as")]
    NoPostgresUser,
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
    #[error("io error while {context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// A running throwaway cluster. Dropping it stops the server and deletes its files.
#[derive(Debug)]
pub struct TempCluster {
    base: PathBuf,
    bindir: PathBuf,
    run_as: Option<String>,
    port: u16,
    stopped: bool,
}

static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempCluster {
    /// Initialises and starts a new cluster; returns when it accepts connections.
    pub fn start(durability: Durability) -> Result<TempCluster, ClusterError> {
        TempCluster::start_with(durability, &[])
    }

    /// Like [`TempCluster::start`], with extra `postgresql.conf` lines (for example
    /// `shared_preload_libraries = 'pg_stat_statements'` to profile a benchmark).
    pub fn start_with(durability: Durability, extra_settings: &[&str]) -> Result<TempCluster, ClusterError> {
        let bindir = find_bindir()?;
        let root = is_root();
        let run_as = if root { Some("postgres".to_string()) } else { None };
        let owner = match &run_as {
            Some(user) => Some(lookup_user(user)?),
            None => None,
        };
        // As root the server user must be able to reach the directory, so use /tmp
        // rather than a TMPDIR that may sit under /root.
        let tmp = if root { PathBuf::from("/tmp") } else { std::env::temp_dir() };
        let n = CLUSTER_COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let base = tmp.join(format!("ledger-pg-{}-{}-{:x}", std::process::id(), n, nanos));
        fs::create_dir(&base).map_err(io_err(format!("creating {}", base.display())))?;
        let cluster = TempCluster { base, bindir, run_as, port: 5432, stopped: false };
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&cluster.base, Some(uid), Some(gid))
                .map_err(io_err("handing the cluster directory to the postgres user"))?;
        }
        set_mode_0700(&cluster.base)?;
        // The watchdog comes first, so that even a failed start is cleaned up.
        cluster.spawn_watchdog()?;
        cluster.init(durability, extra_settings)?;
        cluster.start_server()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.base.join("data")
    }

    fn log_file(&self) -> PathBuf {
        self.base.join("server.log")
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.base
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq connection URL for database `dbname` as the `postgres` superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgresql:///{}?host={}&port={}&user=postgres", dbname, self.base.display(), self.port)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, step: &'static str, mut cmd: Command) -> Result<(), ClusterError> {
        let out = cmd.stdin(Stdio::null()).output().map_err(|e| ClusterError::Step { step, detail: e.to_string() })?;
        if !out.status.success() {
            let mut detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
            if let Ok(log) = fs::read_to_string(self.log_file()) {
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                detail.push_str("\nserver log:\n");
                detail.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            return Err(ClusterError::Step { step, detail });
        }
        Ok(())
    }

    fn init(&self, durability: Durability, extra_settings: &[&str]) -> Result<(), ClusterError> {
        let mut cmd = self.command("initdb");
        cmd.arg("-D").arg(self.data_dir()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        self.run("initdb", cmd)?;
        let mut settings = vec![
            "listen_addresses = ''".to_string(),
            format!("unix_socket_directories = '{}'", self.base.display()),
            format!("port = {}", self.port),
            // The concurrency tests open hundreds of real connections at once.
            "max_connections = 1000".to_string(),
            "shared_buffers = 128MB".to_string(),
            // English, untranslated messages: error classification reads them.
            "lc_messages = 'C'".to_string(),
            // Deadlock tests wait for the detector; the default 1 s makes them slow.
            "deadlock_timeout = '100ms'".to_string(),
            "log_min_messages = 'warning'".to_string(),
            "log_checkpoints = off".to_string(),
        ];
        if durability == Durability::Throwaway {
            settings.extend(["fsync = off", "synchronous_commit = off", "full_page_writes = off"].map(String::from));
        }
        settings.extend(extra_settings.iter().map(|s| s.to_string()));
        let conf = self.data_dir().join("postgresql.conf");
        let mut f =
            fs::OpenOptions::new().append(true).open(&conf).map_err(io_err(format!("opening {}", conf.display())))?;
        writeln!(f, "\n# ledger-core throwaway cluster\n{}", settings.join("\n"))
            .map_err(io_err("writing postgresql.conf"))?;
        Ok(())
    }

    fn start_server(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-w", "-t", "60", "start"])
            // pg_ctl's server must not share our stdout: `cargo test` waits on it.
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run("pg_ctl start", cmd)
    }

    /// Starts a detached shell that waits for this process to exit and then stops the
    /// server (immediate shutdown) and deletes the directory. It has its own process
    /// group, so a Ctrl-C aimed at the test run does not kill it before it cleans up.
    fn spawn_watchdog(&self) -> Result<(), ClusterError> {
        use std::os::unix::process::CommandExt;
        let script = r#"
            owner="$1"; base="$2"
            while kill -0 "$owner" 2>/dev/null; do sleep 0.5; done
            if [ -f "$base/data/postmaster.pid" ]; then
                pid=$(head -n 1 "$base/data/postmaster.pid")
                kill -QUIT "$pid" 2>/dev/null
                i=0
                while kill -0 "$pid" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
            fi
            rm -rf "$base"
        "#;
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("ledger-pg-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.base)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io_err("starting the cluster watchdog"))?;
        Ok(())
    }

    /// Restarts the server (fast shutdown: every connection is cut), as a crash-free
    /// stand-in for a database failover in tests. Returns when it accepts connections.
    pub fn restart(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.log_file())
            .args(["-m", "fast", "-w", "-t", "60", "restart"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run("pg_ctl restart", cmd)
    }

    /// Stops the server (fast shutdown: every connection is cut) and keeps its files, so
    /// [`TempCluster::start_server_again`] can bring it back: a database that is down,
    /// for tests. Returns when it has stopped.
    pub fn stop_server(&self) -> Result<(), ClusterError> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "60", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        self.run("pg_ctl stop", cmd)
    }

    /// Starts the server again after [`TempCluster::stop_server`]; returns when it
    /// accepts connections.
    pub fn start_server_again(&self) -> Result<(), ClusterError> {
        self.start_server()
    }

    /// Stops the server (fast shutdown) and deletes its files.
    pub fn stop(mut self) -> Result<(), ClusterError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), ClusterError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D").arg(self.data_dir()).args(["-m", "fast", "-w", "stop"]).stdout(Stdio::null());
        let result = self.run("pg_ctl stop", cmd);
        let _ = fs::remove_dir_all(&self.base);
        result
    }
}

impl Drop for TempCluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("warning: stopping the throwaway PostgreSQL cluster: {e}");
        }
    }
}

fn is_root() -> bool {
    // Read the effective uid without a libc dependency.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn lookup_user(user: &str) -> Result<(u32, u32), ClusterError> {
    let passwd = fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[0] == user)
        .and_then(|f| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
        .ok_or(ClusterError::NoPostgresUser)
}

fn set_mode_0700(path: &Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err("setting directory mode"))
}

/// Finds the directory holding `initdb`, `pg_ctl` and `postgres`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    // Debian keeps one directory per major version; prefer the newest.
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let dir = e.path().join("bin");
            has_server(&dir).then_some((version, dir))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, dir)| dir).ok_or(ClusterError::BinariesNotFound)
}
