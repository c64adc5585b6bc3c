//! The SQLSTATE of a PostgreSQL error, read from the server's own error report.
//!
//! Retry decisions must not depend on message text: PostgreSQL translates its messages
//! (`lc_messages`), so "deadlock detected" is "Verklemmung entdeckt" on a German server.
//! The five-character SQLSTATE is the same everywhere. Diesel keeps it in the libpq
//! result behind its error but does not expose it, so this module reads it from there
//! (see [`sqlstate`] for how that is done safely). This is the only module of the crate
//! that contains `unsafe` code.

use std::ffi::CStr;
use std::fmt;
use std::mem::{align_of, align_of_val, size_of, size_of_val};
use std::os::raw::c_int;

use diesel::result::{DatabaseErrorInformation, Error as DieselError};
use pq_sys::{PGresult, PQresultErrorField, PG_DIAG_MESSAGE_PRIMARY, PG_DIAG_SQLSTATE};

/// A PostgreSQL error code (SQLSTATE): five characters, digits and upper-case letters,
/// the first two naming the class (`"40"`: transaction rollback, `"08"`: connection
/// exception). See <https://www.postgresql.org/docs/current/errcodes-appendix.html>.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SqlState([u8; 5]);

impl SqlState {
    /// 40001 serialization_failure.
    pub const SERIALIZATION_FAILURE: SqlState = SqlState(*b"40001");
    /// 40P01 deadlock_detected.
    pub const DEADLOCK_DETECTED: SqlState = SqlState(*b"40P01");
    /// 55P03 lock_not_available (lock_timeout, NOWAIT).
    pub const LOCK_NOT_AVAILABLE: SqlState = SqlState(*b"55P03");
    /// 57P01 admin_shutdown (server shutting down, `pg_terminate_backend`).
    pub const ADMIN_SHUTDOWN: SqlState = SqlState(*b"57P01");
    /// 53300 too_many_connections.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState(*b"53300");
    /// 23505 unique_violation.
    pub const UNIQUE_VIOLATION: SqlState = SqlState(*b"23505");
    /// Class 08, connection exception (08000, 08003, 08006, 08P01, ...).
    pub const CONNECTION_EXCEPTION_CLASS: &'static str = "08";

    /// Parses a code; `None` unless it is exactly five digits or upper-case ASCII letters.
    pub fn new(code: &str) -> Option<SqlState> {
        SqlState::from_bytes(code.as_bytes())
    }

    fn from_bytes(bytes: &[u8]) -> Option<SqlState> {
        let bytes: [u8; 5] = bytes.try_into().ok()?;
        bytes.iter().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()).then_some(SqlState(bytes))
    }

    /// The code, e.g. `"40P01"`.
    pub fn as_str(&self) -> &str {
        // `new`/`from_bytes` admit ASCII only, so this cannot fail.
        std::str::from_utf8(&self.0).expect("a SqlState is ASCII")
    }

    /// The class: the first two characters, e.g. `"40"` for `"40P01"`.
    pub fn class(&self) -> &str {
        &self.as_str()[..2]
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SqlState({})", self.as_str())
    }
}

impl PartialEq<&str> for SqlState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The SQLSTATE behind a Diesel error, if it is an error the server (or libpq) reported
/// with one. `None` for everything else, including Diesel's own errors.
pub fn of_diesel_error(error: &DieselError) -> Option<SqlState> {
    match error {
        DieselError::DatabaseError(_, info) => sqlstate(info.as_ref()),
        _ => None,
    }
}

/// The SQLSTATE of a database error's information, when it is Diesel's PostgreSQL error
/// information (the libpq result the error was read from). `None` for anything else,
/// for instance the plain `String` information Diesel uses for errors it makes itself
/// ("Received an empty query", libpq's last connection error).
///
/// How: Diesel 2.3 boxes PostgreSQL errors as a private
/// `PgErrorInformation { result: RawResult }`, `RawResult` being a `NonNull<PGresult>`
/// that the box owns (it is `PQclear`ed when the error is dropped). Its trait methods
/// read fields of that result with `PQresultErrorField`, but there is none for the
/// SQLSTATE, so we read the pointer and ask libpq ourselves, after two checks:
///
/// 1. Shape, before touching anything: the value must have exactly the size and
///    alignment of one pointer. Of the two information types Diesel 2.3 has (`String`,
///    24 bytes, and `PgErrorInformation`), only `PgErrorInformation` does.
/// 2. Identity, before trusting anything read: libpq's primary message of the result
///    (`PG_DIAG_MESSAGE_PRIMARY`) must be the very string, same address, that
///    `info.message()` returns, which is how `PgErrorInformation::message` is written.
///
/// Any mismatch gives `None` (the error is then simply not retried): a Diesel upgrade
/// that changed this would stop retries, never misclassify. Diesel is pinned to `~2.3`
/// in the workspace manifest for this reason, and the integration tests
/// (`tests/sqlstate.rs`) and this module's tests read exact codes from real server
/// errors on every run, so a changed layout fails them.
pub fn sqlstate(info: &(dyn DatabaseErrorInformation + Send + Sync)) -> Option<SqlState> {
    // Check 1: the shape of the concrete value behind the trait object. Both functions
    // read the trait object's metadata only, never the value.
    if size_of_val(info) != size_of::<*mut PGresult>() || align_of_val(info) != align_of::<*mut PGresult>() {
        return None;
    }
    let message = info.message();
    // SAFETY (the argument in full; `unsafe` is confined to this block):
    // - Which type this is. The information inside a `diesel::result::Error` of this
    //   crate comes from Diesel's PostgreSQL backend, which (in the pinned Diesel 2.3;
    //   nothing else is compiled in) creates exactly two implementations of
    //   `DatabaseErrorInformation`: `String` and `PgErrorInformation`. Check 1 leaves
    //   only the latter; neither this workspace nor its dependencies define another
    //   pointer-sized implementation (`DieselError::DatabaseError` values built by hand
    //   with such a type would be outside this function's contract).
    // - Reading the pointer. `PgErrorInformation` has one field, `RawResult`, a
    //   one-field tuple struct around `NonNull<PGresult>`, which is `repr(transparent)`
    //   over `*const PGresult`. A struct whose size equals the size of its only field
    //   has that field at offset 0, so the value's first (and only) word is a non-null,
    //   initialised `*mut PGresult`. `info` is a valid shared reference for the
    //   duration of this call, and the read is aligned (check 1).
    // - Using the pointer. The box owns the PGresult until the error is dropped, which
    //   cannot happen while `info` is borrowed, so it is live for this whole block.
    //   `PQresultErrorField` only reads an immutable PGresult; libpq documents that
    //   PGresults are read-only after creation and safe to use from any thread (the
    //   `Send + Sync` that Diesel's own `RawResult` claims). It returns null or a
    //   NUL-terminated string owned by the result.
    // - Trusting the answer (check 2). `PgErrorInformation::message` returns exactly
    //   `PQresultErrorField(result, PG_DIAG_MESSAGE_PRIMARY)` (as a `&str` over the
    //   same bytes) when present, so equal addresses confirm that this pointer is the
    //   result the message came from. Only then is the SQLSTATE field read, and its
    //   bytes are copied (after validation) before the borrow ends; nothing borrowed
    //   from the PGresult escapes.
    unsafe {
        let result: *mut PGresult =
            (info as *const (dyn DatabaseErrorInformation + Send + Sync)).cast::<*mut PGresult>().read();
        if result.is_null() {
            return None;
        }
        let primary = PQresultErrorField(result, PG_DIAG_MESSAGE_PRIMARY as c_int);
        if primary.is_null() || primary.cast::<u8>().cast_const() != message.as_ptr() {
            return None;
        }
        let code = PQresultErrorField(result, PG_DIAG_SQLSTATE as c_int);
        if code.is_null() {
            return None;
        }
        SqlState::from_bytes(CStr::from_ptr(code).to_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sqlstate_is_five_digits_or_upper_case_letters() {
        for good in ["40P01", "08006", "P0001", "23505", "XX000"] {
            let s = SqlState::new(good).unwrap_or_else(|| panic!("{good} is a valid code"));
            assert_eq!(s.as_str(), good);
            assert_eq!(s.class(), &good[..2]);
            assert_eq!(s.to_string(), good);
        }
        for bad in ["", "4001", "400011", "40p01", "40 01", "4000\u{e9}", "40P0\0"] {
            assert_eq!(SqlState::new(bad), None, "{bad:?} is not a code");
        }
        assert_eq!(SqlState::DEADLOCK_DETECTED, "40P01");
        assert_eq!(format!("{:?}", SqlState::LOCK_NOT_AVAILABLE), "SqlState(55P03)");
    }

    #[test]
    fn information_diesel_makes_from_a_string_has_no_sqlstate() {
        // Diesel's own `String` information (for example "Received an empty query"):
        // rejected by its shape, before anything is read.
        let info: Box<dyn DatabaseErrorInformation + Send + Sync> = Box::new(String::from("40P01"));
        assert_eq!(sqlstate(info.as_ref()), None);
        let error = DieselError::DatabaseError(diesel::result::DatabaseErrorKind::Unknown, info);
        assert_eq!(of_diesel_error(&error), None);
        assert_eq!(of_diesel_error(&DieselError::NotFound), None);
    }

    /// The layout check against a real server error, in this crate's own tests (the
    /// integration tests in `tests/sqlstate.rs` cover many more codes).
    #[ledger_testdb::test]
    fn the_sqlstate_of_a_real_server_error_is_read_from_diesels_error() {
        use diesel::RunQueryDsl;
        ledger_testdb::with_rollback(|conn| {
            let error =
                diesel::sql_query("DO $$ BEGIN RAISE EXCEPTION 'Verklemmung entdeckt' USING ERRCODE = '40P01'; END $$")
                    .execute(conn)
                    .expect_err("RAISE fails");
            assert_eq!(of_diesel_error(&error), Some(SqlState::DEADLOCK_DETECTED), "{error:?}");
        });
    }
}
