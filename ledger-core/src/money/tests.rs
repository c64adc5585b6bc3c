use super::*;

#[test]
fn decimal_strings_parse_exactly_in_the_currency_scale() {
    assert_eq!(Amount::parse("50.00", Currency::EUR).unwrap().minor(), 5000);
    assert_eq!(Amount::parse("50.5", Currency::EUR).unwrap().minor(), 5050);
    assert_eq!(Amount::parse("50", Currency::EUR).unwrap().minor(), 5000);
    assert_eq!(Amount::parse("0.01", Currency::EUR).unwrap().minor(), 1);
    assert_eq!(Amount::parse("1500", Currency::JPY).unwrap().minor(), 1500);
    assert_eq!(Amount::parse("1.234", Currency::KWD).unwrap().minor(), 1234);
    assert_eq!(Amount::parse("007.10", Currency::USD).unwrap().minor(), 710);
}

#[test]
fn over_precise_amounts_are_refused() {
    assert!(matches!(
        Amount::parse("50.001", Currency::EUR),
        Err(InvalidInput::OverPreciseAmount { minor_units: 2, .. })
    ));
    assert!(matches!(Amount::parse("1.5", Currency::JPY), Err(InvalidInput::OverPreciseAmount { minor_units: 0, .. })));
}

#[test]
fn zero_and_negative_amounts_are_refused() {
    for text in ["0", "0.00", "-1.00", "-0"] {
        assert!(matches!(Amount::parse(text, Currency::EUR), Err(InvalidInput::NonPositiveAmount(_))), "{text}");
    }
    assert!(Amount::from_minor(0).is_err());
    assert!(Amount::from_minor(-5).is_err());
    assert_eq!(Amount::from_minor(5).unwrap().minor(), 5);
}

#[test]
fn malformed_amounts_are_refused() {
    for text in ["", "abc", "1,00", "1.", ".5", "+1", "1e3", " 1", "1 ", "1.2.3", "١٢"] {
        assert!(
            matches!(Amount::parse(text, Currency::EUR), Err(InvalidInput::MalformedAmount(_))),
            "{text:?} was accepted"
        );
    }
}

#[test]
fn overflowing_amounts_are_refused() {
    // i64::MAX minor units is 92233720368547758.07 EUR; one cent more overflows.
    assert_eq!(Amount::parse("92233720368547758.07", Currency::EUR).unwrap().minor(), i64::MAX);
    for text in ["92233720368547758.08", "99999999999999999999", "92233720368547759"] {
        assert!(matches!(Amount::parse(text, Currency::EUR), Err(InvalidInput::AmountOverflow(_))), "{text}");
    }
    let max = Amount::from_minor(i64::MAX).unwrap();
    assert_eq!(max.checked_add(Amount::from_minor(1).unwrap()), None);
    assert!(checked_balance(i64::MIN, -1).is_err());
}

#[test]
fn subtraction_never_produces_a_non_positive_amount() {
    let ten = Amount::from_minor(10).unwrap();
    let three = Amount::from_minor(3).unwrap();
    assert_eq!(ten.checked_sub(three).map(Amount::minor), Some(7));
    assert_eq!(ten.checked_sub(ten), None);
    assert_eq!(three.checked_sub(ten), None);
}

#[test]
fn unknown_or_lowercase_currencies_are_refused() {
    assert!(Currency::from_code("EUR").is_ok());
    for code in ["eur", "XXX", "EURO", "", "E"] {
        assert!(matches!(Currency::from_code(code), Err(InvalidInput::UnknownCurrency(_))), "{code}");
    }
}

#[test]
fn amounts_format_back_to_the_string_they_came_from() {
    assert_eq!(Currency::EUR.format_minor(5000), "50.00");
    assert_eq!(Currency::EUR.format_minor(-5), "-0.05");
    assert_eq!(Currency::JPY.format_minor(1500), "1500");
    assert_eq!(Currency::KWD.format_minor(1234), "1.234");
    assert_eq!(Currency::EUR.format_minor(i64::MIN), "-92233720368547758.08");
    for text in ["0.01", "50.00", "123456.78"] {
        assert_eq!(Amount::parse(text, Currency::EUR).unwrap().format(Currency::EUR), text);
    }
}

#[test]
fn named_constants_agree_with_the_table() {
    for c in [Currency::EUR, Currency::USD, Currency::GBP, Currency::JPY, Currency::KWD] {
        assert_eq!(Currency::from_code(c.code()).unwrap(), c);
    }
}
#[test]
fn money_keeps_the_currency_it_was_parsed_in() {
    let yen = Money::parse("100", Currency::JPY).unwrap();
    assert_eq!((yen.minor(), yen.currency()), (100, Currency::JPY));
    assert_eq!(yen.to_string(), "100 JPY");
    assert_eq!(Money::parse("1.5", Currency::EUR).unwrap().to_string(), "1.50 EUR");
    assert!(Money::from_minor(0, Currency::EUR).is_err());
}

#[test]
fn money_of_two_currencies_does_not_add_or_subtract() {
    let eur = Money::from_minor(100, Currency::EUR).unwrap();
    let jpy = Money::from_minor(100, Currency::JPY).unwrap();
    assert_eq!(eur.checked_add(jpy), Err(CurrencyMix { left: Currency::EUR, right: Currency::JPY }));
    assert!(eur.checked_sub(jpy).is_err());
    assert_eq!(eur.checked_add(eur).unwrap().map(Money::minor), Some(200));
    assert_eq!(eur.checked_sub(eur).unwrap(), None);
    let max = Money::from_minor(i64::MAX, Currency::EUR).unwrap();
    assert_eq!(max.checked_add(eur).unwrap(), None);
}

#[test]
fn an_amount_naming_another_currency_than_the_accounts_is_refused() {
    assert_eq!(Money::parse_for("12.50", Currency::EUR).unwrap().minor(), 1250);
    assert_eq!(Money::parse_for("12.50 EUR", Currency::EUR).unwrap().minor(), 1250);
    assert!(matches!(Money::parse_for("100 JPY", Currency::EUR), Err(InvalidInput::BadField { field: "amount", .. })));
    assert!(matches!(Money::parse_for("100 XYZ", Currency::EUR), Err(InvalidInput::UnknownCurrency(_))));
    assert!(matches!(Money::parse_for("1.5 JPY", Currency::JPY), Err(InvalidInput::OverPreciseAmount { .. })));
}
