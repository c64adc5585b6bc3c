//! A connection for the line-reading commands (`submit`, `transfer submit`) that
//! survives a lost connection: a long input is not cut short by a server restart, a
//! failover or a terminated backend. The chunk whose connection was lost is sent again
//! whole on a new connection; that is safe because every line carries its idempotency
//! key, so what the lost connection did write comes back `replayed`, never twice.

use super::*;
use ledger_core::error::{RetryClass, Transient};

/// New connections tried after one is lost, before the command stops (with its
/// "outcome unknown" summary for the chunk).
pub(super) const RECONNECT_ATTEMPTS: u32 = 6;

/// The waits before those tries: 250 ms doubling to 4 s, half jittered, 6 to 12 s in all, long
/// enough for a restart or a failover.
const RECONNECT_BACKOFF: Backoff = Backoff::new(250, 4_000, Jitter::Half);

/// The connection a command's chunks run on, replaced when lost.
pub(super) struct Reconnecting {
    url: String,
    conn: Option<PgConnection>,
    /// Notices on stderr as JSON lines (`--json`), else as text.
    json: bool,
}

impl Reconnecting {
    /// Connects (refusing an outdated schema, as every command does).
    pub(super) fn connect(ctx: &Ctx) -> Result<Reconnecting> {
        // Timeouts on connecting and on a silent peer (as the daemon has): a failover to
        // a host that stops answering must end in a reconnect, not in a hang.
        let url = db::with_network_timeouts(&require_url(ctx.database_url.clone())?);
        let conn = connect(Some(url.clone()))?;
        Ok(Reconnecting { url, conn: Some(conn), json: ctx.json })
    }

    /// A notice on stderr (stdout carries the answers).
    fn notice(&self, value: Value, text: String) {
        eprintln!("{}", if self.json { value.to_string() } else { text });
    }

    /// Runs `f` for input lines `first` to `last`. If the connection is lost (before
    /// or during `f`'s work, so its last commit may or may not have happened), says so on stderr,
    /// connects anew (up to [`RECONNECT_ATTEMPTS`] tries, with backoff) and runs `f`
    /// again from the start. `f` must be safe to run again: its writes are keyed. Any
    /// other error, or a connection still lost after every try, is returned.
    pub(super) fn run<T>(
        &mut self,
        first: u64,
        last: u64,
        mut f: impl FnMut(&mut PgConnection) -> Result<T>,
    ) -> Result<T> {
        let mut tries = 0_u32;
        // Why there is no connection: the one lost, or the last try to connect.
        let mut error = anyhow!("not connected");
        loop {
            if let Some(conn) = self.conn.as_mut() {
                match f(conn) {
                    Ok(value) => return Ok(value),
                    Err(e) if connection_lost(&e) => error = e,
                    Err(e) => return Err(e),
                }
                self.conn = None;
            }
            tries += 1;
            if tries > RECONNECT_ATTEMPTS {
                return Err(
                    error.context(format!("no database connection after {RECONNECT_ATTEMPTS} tries to connect again"))
                );
            }
            self.notice(
                json!({ "notice": "reconnecting", "lines": { "from": first, "to": last }, "attempt": tries,
                        "of": RECONNECT_ATTEMPTS, "error": format!("{error:#}") }),
                format!(
                    "no database connection ({error:#}); reconnecting, try {tries} of {RECONNECT_ATTEMPTS}, to send \
                     lines {first} to {last} again (each under its key: what a lost connection wrote is answered \
                     replayed)"
                ),
            );
            std::thread::sleep(RECONNECT_BACKOFF.delay(tries - 1));
            match connect(Some(self.url.clone())) {
                Ok(conn) => self.conn = Some(conn),
                Err(e) if connection_lost(&e) => error = e,
                Err(e) => return Err(e.context("connecting again after a lost connection")),
            }
        }
    }
}

/// Whether `e` says the connection is gone (the server ended it, the socket closed, or
/// connecting failed: the crate reports every failure to connect so, a wrong password
/// too, which then costs the tries before the command stops): only a new connection
/// can go on.
fn connection_lost(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let class = if let Some(l) = cause.downcast_ref::<LedgerError>() {
            l.transient()
        } else if let Some(d) = cause.downcast_ref::<diesel::result::Error>() {
            d.transient()
        } else {
            None
        };
        class == Some(Transient::ConnectionLost)
    })
}
