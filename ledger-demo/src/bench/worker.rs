//! The worker under test: a separate `ledger-demo run` process (the daemon's own code), started and stopped
//! by the bench, with the flags of the mode measured.

use super::*;

/// The worker's flags that not every build has.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct WorkerFlags {
    pub(super) payout_concurrency: bool,
}

/// Asks the worker binary which optional `run` flags it has.
pub(super) fn worker_flags() -> Result<WorkerFlags> {
    let exe = std::env::current_exe().context("locating ledger-demo")?;
    let help =
        Command::new(exe).args(["run", "--help"]).stdin(Stdio::null()).output().context("ledger-demo run --help")?;
    let text = String::from_utf8_lossy(&help.stdout);
    Ok(WorkerFlags { payout_concurrency: text.contains("--payout-concurrency") })
}

/// How the worker under test is started for one mode.
pub(super) struct WorkerSpec<'a> {
    pub(super) url: &'a str,
    pub(super) mode: Mode,
    pub(super) threads: usize,
    pub(super) batch_size: usize,
    pub(super) modes: &'a ModeOptions,
    pub(super) flags: WorkerFlags,
    /// The local bank and the credentials it expects (webhook mode).
    pub(super) bank: Option<(&'a Bank, &'a str, &'a str)>,
}

impl WorkerSpec<'_> {
    /// The payout settings passed to the worker (none: its defaults).
    pub(super) fn payout_args(&self) -> Vec<String> {
        let mut args = vec![];
        if self.mode.end_to_end() {
            if let Some(n) = self.modes.payout_threads {
                args.extend(["--payout-threads".to_string(), n.to_string()]);
            }
            if let Some(n) = self.modes.payout_batch {
                args.extend(["--payout-batch".to_string(), n.to_string()]);
            }
            if let (Some(n), true) = (self.modes.payout_concurrency, self.flags.payout_concurrency) {
                args.extend(["--payout-concurrency".to_string(), n.to_string()]);
            }
        }
        args
    }
}

/// A `ledger-demo run` child process. Dropping it stops it (SIGTERM, then SIGKILL).
pub(super) struct Worker {
    pub(super) child: Child,
}

impl Worker {
    pub(super) fn spawn(spec: &WorkerSpec<'_>, exit_when_idle: bool) -> Result<Worker> {
        use ledger_worker::webhook::{SECRET_FILE_VAR, SECRET_VAR, TOKEN_FILE_VAR, TOKEN_VAR};
        let exe = std::env::current_exe().context("locating ledger-demo")?;
        let mut cmd = Command::new(exe);
        cmd.args(["run", "--gateway", spec.mode.gateway(), "--log-format", "json"])
            .args(["--threads", &spec.threads.to_string(), "--batch-size", &spec.batch_size.to_string()])
            .args(["--poll-interval-ms", "200"])
            .env("DATABASE_URL", spec.url)
            .env("RUST_LOG", "warn")
            .env_remove(TOKEN_VAR)
            .env_remove(SECRET_VAR)
            .env_remove(TOKEN_FILE_VAR)
            .env_remove(SECRET_FILE_VAR)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        cmd.args(spec.payout_args());
        if let Some((bank, token, secret)) = spec.bank {
            cmd.args(["--payout-webhook", bank.url()]).env(TOKEN_VAR, token).env(SECRET_VAR, secret);
        }
        if exit_when_idle {
            cmd.arg("--exit-when-idle");
        }
        Ok(Worker { child: cmd.spawn().context("starting the worker")? })
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub(super) fn signal(&self, signal: &str) {
        let _ = Command::new("kill").args([signal, &self.pid().to_string()]).status();
    }

    /// Waits up to `patience` for the process to exit by itself, then asks it to stop.
    pub(super) fn wait(&mut self, patience: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.stop()
    }

    /// SIGTERM (the worker's graceful stop); SIGKILL if it is still there 30 s later.
    pub(super) fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        Ok(self.child.wait()?)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("-TERM");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
