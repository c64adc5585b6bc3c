use super::*;

#[test]
fn sqlstates_map_to_retry_classes_and_everything_else_is_not_retried() {
    use Transient::*;
    let table: &[(&str, Option<Transient>)] = &[
        ("40001", Some(SerializationFailure)),
        ("40P01", Some(Deadlock)),
        ("55P03", Some(LockNotAvailable)),
        ("53300", Some(TooManyConnections)),
        ("57P01", Some(ConnectionLost)),
        ("08000", Some(ConnectionLost)),
        ("08001", Some(ConnectionLost)),
        ("08003", Some(ConnectionLost)),
        ("08004", Some(ConnectionLost)),
        ("08006", Some(ConnectionLost)),
        ("08007", Some(ConnectionLost)),
        ("08P01", Some(ConnectionLost)),
        // Not retried: constraint violations, data errors, plain RAISE, and the
        // neighbours of the retried codes.
        ("23505", None),
        ("23503", None),
        ("22012", None),
        ("P0001", None),
        ("XX000", None),
        ("00000", None),
        ("40000", None),
        ("40002", None),
        ("40003", None),
        ("55000", None),
        ("55P02", None),
        ("55006", None),
        ("53000", None),
        ("53100", None),
        ("53200", None),
        ("57000", None),
        ("57014", None),
        ("57P02", None),
        ("57P03", None),
        ("80000", None),
        ("0A000", None),
        ("0800", None), // not a code at all
    ];
    for (code, expected) in table {
        let got = SqlState::new(code).and_then(Transient::from_sqlstate);
        assert_eq!(got, *expected, "SQLSTATE {code}");
    }
}

#[test]
fn insufficient_funds_reads_in_decimals_with_the_currency() {
    let e = LedgerError::InsufficientFunds {
        account: AccountId::from_db(117),
        currency: Currency::EUR,
        balance_minor: 1_150,
        floor_minor: 0,
        requested_minor: 10_000_000,
    };
    assert_eq!(
        e.to_string(),
        "insufficient funds in account 117: balance 11.50 EUR, floor 0.00 EUR, requested 100000.00 EUR"
    );
    let jpy = LedgerError::InsufficientFunds {
        account: AccountId::from_db(9),
        currency: Currency::JPY,
        balance_minor: -5,
        floor_minor: -100,
        requested_minor: 200,
    };
    assert_eq!(jpy.to_string(), "insufficient funds in account 9: balance -5 JPY, floor -100 JPY, requested 200 JPY");
}

#[test]
fn diesels_own_kinds_are_classified_without_a_sqlstate() {
    let info = || -> Box<dyn diesel::result::DatabaseErrorInformation + Send + Sync> {
        // Text that would once have been recognised: it must not matter now.
        Box::new(String::from("deadlock detected"))
    };
    let cases = [
        (
            DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, info()),
            Some(Transient::SerializationFailure),
        ),
        (DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info()), Some(Transient::ConnectionLost)),
        (DieselError::DatabaseError(DatabaseErrorKind::UnableToSendCommand, info()), Some(Transient::ConnectionLost)),
        (DieselError::BrokenTransactionManager, Some(Transient::ConnectionLost)),
        (DieselError::DatabaseError(DatabaseErrorKind::Unknown, info()), None),
        (DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info()), None),
        (DieselError::NotFound, None),
    ];
    for (error, expected) in cases {
        assert_eq!(error.transient(), expected, "{error:?}");
    }
}
