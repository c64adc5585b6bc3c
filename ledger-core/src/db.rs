//! Connections, pools and migrations.

use std::time::{Duration, Instant};

use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection};
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use crate::error::LedgerError;

/// The schema migrations, embedded at compile time from the workspace's `migrations/`.
pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("../migrations");

/// A bounded pool of PostgreSQL connections, each with the [`SessionConfig`] it was
/// built with applied ([`pool`]).
pub type Pool = diesel::r2d2::Pool<ConnectionManager<PgConnection>>;
/// A connection borrowed from a [`Pool`]; dropping it gives it back.
pub type PooledConnection = diesel::r2d2::PooledConnection<ConnectionManager<PgConnection>>;

/// How many migrations the crate embeds.
pub fn migration_count() -> usize {
    use diesel::migration::MigrationSource;
    use diesel::pg::Pg;
    MigrationSource::<Pg>::migrations(&MIGRATIONS).map(|m| m.len()).unwrap_or(0)
}

/// Applies every pending migration; returns how many ran.
pub fn run_migrations(conn: &mut PgConnection) -> Result<usize, LedgerError> {
    let applied =
        conn.run_pending_migrations(MIGRATIONS).map_err(|e| LedgerError::Pool(format!("running migrations: {e}")))?;
    Ok(applied.len())
}

/// Session settings applied to every connection the ledger opens.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Longest a statement waits for a row or advisory lock before failing with
    /// lock_not_available (55P03), which the transaction runner retries. `None` keeps
    /// the server's setting (which by default waits forever).
    pub lock_timeout_ms: Option<u64>,
    /// Longest any single statement may run. `None` keeps the server's setting.
    pub statement_timeout_ms: Option<u64>,
    /// Shown in pg_stat_activity, and so by `locks::holder`.
    pub application_name: Option<String>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { lock_timeout_ms: Some(5_000), statement_timeout_ms: None, application_name: None }
    }
}

impl SessionConfig {
    fn sql(&self) -> String {
        let mut sql = String::new();
        if let Some(ms) = self.lock_timeout_ms {
            sql.push_str(&format!("SET lock_timeout = {ms};"));
        }
        if let Some(ms) = self.statement_timeout_ms {
            sql.push_str(&format!("SET statement_timeout = {ms};"));
        }
        if let Some(name) = &self.application_name {
            // Keep it to a safe alphabet rather than quoting arbitrary text into SQL.
            let clean: String =
                name.chars().filter(|c| c.is_ascii_alphanumeric() || "-_.:/ ".contains(*c)).take(63).collect();
            sql.push_str(&format!("SET application_name = '{clean}';"));
        }
        sql
    }

    /// Applies the settings to an open connection.
    pub fn apply(&self, conn: &mut PgConnection) -> Result<(), LedgerError> {
        let sql = self.sql();
        if !sql.is_empty() {
            conn.batch_execute(&sql)?;
        }
        Ok(())
    }
}

/// Opens one connection and applies `session`.
pub fn connect(url: &str, session: &SessionConfig) -> Result<PgConnection, LedgerError> {
    let mut conn = PgConnection::establish(url)
        .map_err(|e| LedgerError::Pool(format!("connecting to {}: {e}", redact_url(url))))?;
    session.apply(&mut conn)?;
    Ok(conn)
}

/// Called on every connection a pool hands out, before its session settings are applied
/// (the test harness watches connections this way; production pools have none).
pub type ConnectionHook = std::sync::Arc<dyn Fn(&mut PgConnection) + Send + Sync>;

struct ApplySession {
    session: SessionConfig,
    hook: Option<ConnectionHook>,
}

impl std::fmt::Debug for ApplySession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApplySession").field("session", &self.session).finish()
    }
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for ApplySession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        if let Some(hook) = &self.hook {
            hook(conn);
        }
        self.session.apply(conn).map_err(|e| match e {
            LedgerError::Database(d) => diesel::r2d2::Error::QueryError(d),
            other => {
                diesel::r2d2::Error::QueryError(diesel::result::Error::QueryBuilderError(other.to_string().into()))
            }
        })
    }
}

/// Pool limits. Everything is bounded: connections, and how long a caller waits for one.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The most connections open at once (at least 1).
    pub max_size: u32,
    /// Connections kept open while idle; `None` means `max_size` (all opened up front).
    pub min_idle: Option<u32>,
    /// Longest a caller waits for a free connection before a [`LedgerError::Pool`]
    /// error; also the limit of building the pool.
    pub connection_timeout_ms: u64,
    /// Settings applied to every connection the pool hands out.
    pub session: SessionConfig,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { max_size: 8, min_idle: None, connection_timeout_ms: 10_000, session: SessionConfig::default() }
    }
}

/// Builds an r2d2 pool; fails fast if the database cannot be reached.
pub fn pool(url: &str, config: &PoolConfig) -> Result<Pool, LedgerError> {
    build_pool(url, config, ApplySession { session: config.session.clone(), hook: None })
}

/// A pool that runs `hook` on every connection it hands out.
pub fn pool_with_hook(url: &str, config: &PoolConfig, hook: Option<ConnectionHook>) -> Result<Pool, LedgerError> {
    build_pool(url, config, ApplySession { session: config.session.clone(), hook })
}

fn build_pool(url: &str, config: &PoolConfig, customizer: ApplySession) -> Result<Pool, LedgerError> {
    assert!(config.max_size > 0, "a pool needs at least one connection");
    diesel::r2d2::Pool::builder()
        .max_size(config.max_size)
        .min_idle(config.min_idle)
        // No `SELECT 1` round trip on every checkout: a dead connection fails its first
        // statement with ConnectionLost, which the transaction runners retry on a fresh one.
        .test_on_check_out(false)
        .connection_timeout(Duration::from_millis(config.connection_timeout_ms))
        .connection_customizer(Box::new(customizer))
        .build(ConnectionManager::<PgConnection>::new(url))
        .map_err(|e| LedgerError::Pool(format!("building a pool for {}: {e}", redact_url(url))))
}

/// How long one wait inside [`checkout`] lasts before it asks whether to go on.
const CHECKOUT_SLICE: Duration = Duration::from_millis(100);

/// Takes a connection from the pool, waiting at most the pool's connection timeout, in
/// short slices: between them `give_up(waited so far)` is asked, and `true` ends the wait
/// at once with an error. `pool.get()` cannot be interrupted; this can (a shutdown).
pub fn checkout(pool: &Pool, give_up: &dyn Fn(Duration) -> bool) -> Result<PooledConnection, LedgerError> {
    let limit = pool.connection_timeout();
    let started = Instant::now();
    // r2d2 reports why connecting failed once, in the slice that saw it: keep it.
    let mut why: Option<String> = None;
    let fail = |what: String, why: Option<String>| {
        LedgerError::Pool(match why {
            Some(why) => format!("{what}: {why}"),
            None => what,
        })
    };
    loop {
        let waited = started.elapsed();
        if give_up(waited) {
            return Err(fail(format!("gave up waiting for a connection after {} ms", waited.as_millis()), why));
        }
        let left = limit.saturating_sub(waited);
        if left.is_zero() {
            return Err(fail(format!("timed out waiting for a connection ({} ms)", limit.as_millis()), why));
        }
        match pool.get_timeout(left.min(CHECKOUT_SLICE)) {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                let text = e.to_string();
                if let Some((_, detail)) = text.split_once(": ") {
                    why = Some(detail.to_string());
                }
            }
        }
    }
}

/// libpq parameters that [`with_network_timeouts`] adds when the URL does not set them,
/// so that a connection to a server that stopped answering fails by itself instead of
/// waiting forever: connecting gives up after 10 s; on TCP, an idle connection is probed
/// after 10 s and declared dead after 3 unanswered probes 5 s apart, and data left
/// unacknowledged for 30 s closes the connection. libpq ignores the TCP ones on Unix
/// sockets. None of them limits how long a healthy server may take to answer.
pub const NETWORK_TIMEOUTS: &[(&str, &str)] = &[
    ("connect_timeout", "10"),
    ("keepalives", "1"),
    ("keepalives_idle", "10"),
    ("keepalives_interval", "5"),
    ("keepalives_count", "3"),
    ("tcp_user_timeout", "30000"),
];

/// Returns `url` (a `postgres://`/`postgresql://` URI or a `key=value` connection
/// string) with every [`NETWORK_TIMEOUTS`] parameter it does not set appended. Left
/// alone: parameters already in the URL, `connect_timeout` when `PGCONNECT_TIMEOUT` is
/// set, everything when a service (`service=` or `PGSERVICE`) may set them, and
/// `tcp_user_timeout` with a libpq older than 12, which would refuse it.
pub fn with_network_timeouts(url: &str) -> String {
    let env_set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    // SAFETY: PQlibVersion only returns a constant; it needs no connection or state.
    let libpq = unsafe { pq_sys::PQlibVersion() };
    add_missing_params(url, env_set("PGSERVICE"), env_set("PGCONNECT_TIMEOUT"), libpq)
}

fn add_missing_params(url: &str, service_env: bool, connect_timeout_env: bool, libpq_version: i32) -> String {
    let uri = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let has = |key: &str| if uri { uri_has_param(url, key) } else { conninfo_has_param(url, key) };
    if service_env || has("service") {
        return url.to_string();
    }
    let mut out = url.to_string();
    for (key, value) in NETWORK_TIMEOUTS {
        let skip = has(key)
            || (*key == "connect_timeout" && connect_timeout_env)
            || (*key == "tcp_user_timeout" && libpq_version < 120_000);
        if skip {
            continue;
        }
        if uri {
            match out.find('?') {
                None => out.push('?'),
                Some(q) if q + 1 == out.len() || out.ends_with('&') => {}
                Some(_) => out.push('&'),
            }
        } else if !out.is_empty() && !out.ends_with(char::is_whitespace) {
            out.push(' ');
        }
        out.push_str(&format!("{key}={value}"));
    }
    out
}

fn uri_has_param(url: &str, key: &str) -> bool {
    let Some(q) = url.find('?') else { return false };
    url[q + 1..].split('&').any(|p| p.split('=').next() == Some(key))
}

/// Whether a `key = value` connection string sets `key` (a key at the start or after
/// whitespace, followed by `=`). A match inside a quoted value errs on the side of not
/// adding the parameter.
fn conninfo_has_param(conninfo: &str, key: &str) -> bool {
    conninfo.match_indices(key).any(|(at, _)| {
        let before_ok = conninfo[..at].chars().next_back().is_none_or(char::is_whitespace);
        let after = conninfo[at + key.len()..].trim_start();
        before_ok && after.starts_with('=')
    })
}

/// Hides the password in a connection URL, for messages and logs.
pub fn redact_url(url: &str) -> String {
    // postgres://user:secret@host/db -> postgres://user:***@host/db
    let Some(scheme_end) = url.find("://") else { return redact_conninfo_password(url) };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else { return redact_query_password(url) };
    let userinfo = &authority[..at];
    let redacted_userinfo = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => userinfo.to_string(),
    };
    let out = format!("{}{}{}", &url[..scheme_end + 3], redacted_userinfo, &rest[at..]);
    redact_query_password(&out)
}

/// A `key=value` connection string with its password's value replaced: `password = x`
/// or `password='x y'` (quoted, `\'` and `\\` escaped) becomes `password=***`.
fn redact_conninfo_password(conninfo: &str) -> String {
    let mut out = String::with_capacity(conninfo.len());
    let mut rest = conninfo;
    while !rest.is_empty() {
        let trimmed = rest.trim_start();
        out.push_str(&rest[..rest.len() - trimmed.len()]);
        rest = trimmed;
        let key_end = rest.find(|c: char| c == '=' || c.is_whitespace()).unwrap_or(rest.len());
        let key = &rest[..key_end];
        let after_key = rest[key_end..].trim_start();
        let Some(value) = after_key.strip_prefix('=') else {
            out.push_str(rest); // not key=value: left as it is
            break;
        };
        let value = value.trim_start();
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut chars = quoted.char_indices();
            let mut end = quoted.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => {
                        end = i + 1;
                        break;
                    }
                    _ => {}
                }
            }
            1 + end
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        if key == "password" {
            out.push_str("password=***");
        } else {
            out.push_str(&rest[..rest.len() - value.len() + value_len]);
        }
        rest = &value[value_len..];
    }
    out
}

fn redact_query_password(url: &str) -> String {
    let Some(q) = url.find('?') else { return url.to_string() };
    let params: Vec<String> = url[q + 1..]
        .split('&')
        .map(|p| if p.starts_with("password=") { "password=***".to_string() } else { p.to_string() })
        .collect();
    format!("{}?{}", &url[..q], params.join("&"))
}

/// Replaces the database name in a libpq URL (`scheme://authority/dbname?params`).
pub fn with_database(url: &str, dbname: &str) -> String {
    let Some(scheme_end) = url.find("://") else { return url.to_string() };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let after_authority = &rest[authority_end..];
    let query = after_authority.find('?').map(|q| &after_authority[q..]).unwrap_or("");
    format!("{}{}/{}{}", &url[..scheme_end + 3], &rest[..authority_end], dbname, query)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_appear_in_redacted_urls() {
        assert_eq!(redact_url("host=db password=s3cret user=app"), "host=db password=*** user=app");
        assert_eq!(redact_url("host=db password = 's3 \\'cret' user=app"), "host=db password=*** user=app");
        assert_eq!(redact_url("password='open"), "password=***");
        assert_eq!(redact_url("dbname=ledger host=/tmp"), "dbname=ledger host=/tmp");
        assert_eq!(redact_url("  host = db  "), "  host = db  ");
        assert_eq!(redact_url("postgres://app:s3cret@db:5432/ledger"), "postgres://app:***@db:5432/ledger");
        assert_eq!(redact_url("postgres://app@db/ledger"), "postgres://app@db/ledger");
        assert_eq!(
            redact_url("postgresql:///ledger?host=/tmp&password=s3cret&user=x"),
            "postgresql:///ledger?host=/tmp&password=***&user=x"
        );
        assert!(!redact_url("postgres://a:p%40ss@h/d").contains("p%40ss"));
    }

    #[test]
    fn the_database_name_can_be_swapped() {
        assert_eq!(with_database("postgres://u:p@h:1/a?sslmode=off", "b"), "postgres://u:p@h:1/b?sslmode=off");
        assert_eq!(with_database("postgresql:///a?host=/tmp", "b"), "postgresql:///b?host=/tmp");
        assert_eq!(with_database("postgres://h", "b"), "postgres://h/b");
    }

    #[test]
    fn a_checkout_waits_in_slices_and_gives_up_when_asked() {
        let db = ledger_testdb::committed();
        let config =
            PoolConfig { max_size: 1, min_idle: Some(1), connection_timeout_ms: 30_000, ..PoolConfig::default() };
        let pool = pool(db.url(), &config).unwrap();
        let held = checkout(&pool, &|_| false).unwrap();
        // The only connection is taken: a plain `get` would wait 30 s.
        let started = std::time::Instant::now();
        let e = checkout(&pool, &|waited| waited >= Duration::from_millis(200)).err().expect("no connection is free");
        assert!(started.elapsed() < Duration::from_secs(2), "gave up after {:?}", started.elapsed());
        assert!(e.to_string().contains("gave up waiting for a connection"), "{e}");
        drop(held);
        assert!(checkout(&pool, &|_| false).is_ok());
    }

    #[test]
    fn network_timeouts_are_added_only_where_missing() {
        let all = "connect_timeout=10&keepalives=1&keepalives_idle=10&keepalives_interval=5&keepalives_count=3&tcp_user_timeout=30000";
        assert_eq!(
            add_missing_params("postgres://u@h:5432/db", false, false, 150_000),
            format!("postgres://u@h:5432/db?{all}")
        );
        // Unix-socket URLs keep their host; the TCP-only parameters are ignored by libpq there.
        assert_eq!(
            add_missing_params("postgresql:///db?host=/tmp/s&port=5432", false, false, 150_000),
            format!("postgresql:///db?host=/tmp/s&port=5432&{all}")
        );
        assert_eq!(add_missing_params("postgres://h/db?", false, false, 150_000), format!("postgres://h/db?{all}"));
        // What the user set stays as it is, and is not repeated.
        let mine = add_missing_params("postgres://h/db?connect_timeout=3&keepalives=0", false, false, 150_000);
        assert!(mine.starts_with("postgres://h/db?connect_timeout=3&keepalives=0&keepalives_idle=10"), "{mine}");
        assert_eq!(mine.matches("connect_timeout=").count(), 1);
        assert_eq!(mine.matches("keepalives=").count(), 1);
        assert!(!add_missing_params("postgres://h/db", false, true, 150_000).contains("connect_timeout"));
        assert!(!add_missing_params("postgres://h/db", false, false, 110_000).contains("tcp_user_timeout"));
        // A service file may set them: leave everything to it.
        assert_eq!(
            add_missing_params("postgres:///db?service=ledger", false, false, 150_000),
            "postgres:///db?service=ledger"
        );
        assert_eq!(add_missing_params("postgres:///db", true, false, 150_000), "postgres:///db");
        // key=value connection strings.
        assert_eq!(
            add_missing_params("host=/tmp dbname=x connect_timeout = 4", false, false, 150_000),
            "host=/tmp dbname=x connect_timeout = 4 keepalives=1 keepalives_idle=10 keepalives_interval=5 keepalives_count=3 tcp_user_timeout=30000"
        );
        assert!(add_missing_params("", false, false, 150_000).starts_with("connect_timeout=10 keepalives=1"));
        // A longer key that ends like one of ours does not count as it.
        assert!(
            add_missing_params("dbname=x xconnect_timeout=1", false, false, 150_000).contains(" connect_timeout=10")
        );
    }
}
