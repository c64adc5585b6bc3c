//! The pool's threads: each registered with what it is doing, so shutdown can wait for
//! them with a deadline and name the ones still busy; restarts after a panic; sliced
//! sleeps that end at shutdown.

use super::*;

/// The pool's threads, each with what it is doing now, so that shutdown can wait for
/// them with a deadline and name the ones still busy when it runs out.
#[derive(Default)]
pub(super) struct Tracker {
    threads: Mutex<BTreeMap<String, &'static str>>,
    changed: Condvar,
}

/// A thread's entry in the [`Tracker`]: made before the thread is spawned, moved into
/// it, and dropped when it ends (also by a panic), which removes the entry.
pub(super) struct Tracked {
    tracker: Arc<Tracker>,
    name: String,
}

thread_local! {
    static TRACKED: RefCell<Option<(Arc<Tracker>, String)>> = const { RefCell::new(None) };
}

impl Tracker {
    pub(super) fn threads(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, &'static str>> {
        self.threads.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn register(self: &Arc<Self>, name: &str) -> Tracked {
        self.threads().insert(name.to_string(), "starting");
        Tracked { tracker: self.clone(), name: name.to_string() }
    }

    /// Waits until every tracked thread has ended or `deadline` passes; returns the
    /// threads still running then, with what they are doing.
    pub(super) fn wait_all(&self, deadline: Instant) -> Vec<(String, &'static str)> {
        let mut threads = self.threads();
        loop {
            let now = Instant::now();
            if threads.is_empty() || now >= deadline {
                return threads.iter().map(|(name, what)| (name.clone(), *what)).collect();
            }
            threads = self.changed.wait_timeout(threads, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

impl Tracked {
    /// Called first thing on the tracked thread, so that [`doing`] finds its entry.
    pub(super) fn enter(&self) {
        TRACKED.with(|t| *t.borrow_mut() = Some((self.tracker.clone(), self.name.clone())));
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Dropped on its own thread, normally; on the spawning one if the spawn failed.
        let _ = TRACKED.try_with(|t| {
            let mut t = t.borrow_mut();
            if t.as_ref().is_some_and(|(_, name)| *name == self.name) {
                *t = None;
            }
        });
        self.tracker.threads().remove(&self.name);
        self.tracker.changed.notify_all();
    }
}

/// Notes what the current (tracked) thread is about to do; a shutdown that cannot wait
/// for the thread any longer reports it.
pub(super) fn doing(what: &'static str) {
    TRACKED.with(|t| {
        if let Some((tracker, name)) = &*t.borrow() {
            if let Some(slot) = tracker.threads().get_mut(name) {
                *slot = what;
            }
        }
    });
}

/// Spawns a thread registered in `tracker` for as long as it runs.
pub(super) fn spawn_tracked<T: Send + 'static>(
    tracker: &Arc<Tracker>,
    name: String,
    body: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<JoinHandle<T>> {
    let tracked = tracker.register(&name);
    thread::Builder::new().name(name).spawn(move || {
        tracked.enter();
        let _tracked = tracked;
        body()
    })
}

/// Runs a long-lived loop (claimer, dispatcher) until shutdown, restarting it in place
/// after a panic instead of letting the thread die: a daemon that silently stopped
/// claiming would look alive and do nothing.
pub(super) fn resilient(shared: &Shared, what: &str, body: impl Fn()) {
    loop {
        match catch_unwind(AssertUnwindSafe(&body)) {
            Ok(()) => return,
            Err(panic) => {
                shared.metrics.panics.fetch_add(1, Ordering::Relaxed);
                error!(thread = what, panic = panic_message(&panic), "panicked; restarting it");
                if shared.stopping() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

pub(super) fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".into())
}

/// How long a thread waits before reconnecting after `failures` failures in a row.
pub(super) fn backoff(failures: u32) -> Duration {
    const RECONNECT: Backoff = Backoff::new(20, 2_000, Jitter::Half);
    RECONNECT.delay(failures)
}
