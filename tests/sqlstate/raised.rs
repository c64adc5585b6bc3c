//! Errors raised from PL/pgSQL with German or misleading English text and a chosen ERRCODE.

use super::*;

// ---- 1. Transient codes with German text are retried --------------------------------

#[testing::test]
fn a_serialization_failure_with_german_text_is_retried() {
    assert_retried_on_one_connection(
        "40001",
        "konnte Zugriff nicht serialisieren wegen Abhängigkeiten zwischen Transaktionen",
        Transient::SerializationFailure,
    );
}

#[testing::test]
fn a_deadlock_with_german_text_is_retried() {
    assert_retried_on_one_connection("40P01", "Verklemmung entdeckt", Transient::Deadlock);
}

#[testing::test]
fn a_lock_not_available_with_german_text_is_retried() {
    assert_retried_on_one_connection(
        "55P03",
        "breche Anweisung ab wegen Zeitüberschreitung einer Sperre",
        Transient::LockNotAvailable,
    );
}

#[testing::test]
fn too_many_connections_with_german_text_is_retried() {
    assert_retried_on_one_connection(
        "53300",
        "tut mir leid, schon zu viele Verbindungen",
        Transient::TooManyConnections,
    );
}

#[testing::test]
fn an_admin_shutdown_with_german_text_is_retried_on_a_fresh_pooled_connection() {
    assert_retried_on_fresh_pooled_connections(
        "57P01",
        "Verbindung wird abgebrochen aufgrund von Anweisung des Administrators",
    );
}

#[testing::test]
fn connection_exceptions_with_german_text_are_retried_on_a_fresh_pooled_connection() {
    // Diesel itself maps 08000 and 08006 to ClosedConnection; 08003 and 08P01 it does
    // not, so those are recognised by their class alone.
    for (code, text) in [
        ("08000", "Verbindungsfehler"),
        ("08006", "Verbindung zum Server wurde unerwartet geschlossen"),
        ("08003", "Verbindung existiert nicht"),
        ("08P01", "ungültige Frontend-Message-Länge"),
    ] {
        assert_retried_on_fresh_pooled_connections(code, text);
    }
}

// ---- 2. Everything else is not retried -----------------------------------------------

#[testing::test]
fn a_unique_violation_with_german_text_is_not_retried() {
    let db = database();
    assert_not_retried(&db, "23505", "doppelter Schlüsselwert verletzt Unique-Constraint");
}

#[testing::test]
fn other_errors_with_german_text_are_not_retried() {
    let db = database();
    for (code, text) in [
        ("22012", "Division durch Null"),
        ("P0001", "Konto gesperrt"),
        ("57014", "storniere Anfrage wegen Zeitüberschreitung der Anweisung"),
        ("53200", "Speicher aufgebraucht"),
    ] {
        assert_not_retried(&db, code, text);
    }
}

#[testing::test]
fn english_messages_that_look_transient_are_not_retried_under_another_code() {
    // The texts the classification once matched: they mean nothing without the code.
    let db = database();
    for text in [
        "deadlock detected",
        "canceling statement due to lock timeout",
        "could not obtain lock on row in relation accounts",
        "terminating connection due to administrator command",
        "server closed the connection unexpectedly",
        "no connection to the server",
    ] {
        assert_not_retried(&db, "P0001", text);
    }
}
