//! The daemon's one stop signal. Every loop and every wait asks it, so shutdown is
//! bounded whatever the database or the gateway do.

use super::*;

/// Stopping (no new claims), the end of the grace period (no new work, no more
/// waiting), and whether the rest of the queue is left pending at once (the database
/// failed a batch during shutdown).
#[derive(Default)]
pub(super) struct Shutdown {
    stopping: AtomicBool,
    deadline: Mutex<Option<Instant>>,
    queue_abandoned: AtomicBool,
}

impl Shutdown {
    /// Starts the shutdown: the grace period ends `grace` after `started`.
    pub(super) fn begin(&self, started: Instant, grace: Duration) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(started + grace);
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Stopping, and the grace period is over.
    pub(super) fn past_deadline(&self) -> bool {
        let deadline = *self.deadline.lock().unwrap_or_else(|e| e.into_inner());
        deadline.is_some_and(|d| Instant::now() > d)
    }

    /// The database failed a batch during shutdown: leave the rest of the queue pending
    /// instead of failing one batch after another.
    pub(super) fn abandon_queue(&self) {
        self.queue_abandoned.store(true, Ordering::SeqCst);
    }

    pub(super) fn queue_abandoned(&self) -> bool {
        self.queue_abandoned.load(Ordering::SeqCst)
    }

    /// Queued jobs are left pending (the next run claims them): stopping, and out of
    /// grace or the queue abandoned.
    pub(super) fn leave_queue(&self) -> bool {
        self.stopping() && (self.past_deadline() || self.queue_abandoned())
    }

    /// Sleeps for `total`, or until shutdown begins.
    pub(super) fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        loop {
            let now = Instant::now();
            if now >= until || self.stopping() {
                return;
            }
            thread::sleep((until - now).min(Duration::from_millis(10)));
        }
    }
}
