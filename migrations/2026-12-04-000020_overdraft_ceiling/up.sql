-- An overdraft limit may not exceed its currency's ceiling (issue 12): without one,
-- `--overdraft-limit 92233720368547758.07` was accepted and put the floor near -i64::MAX.
-- The default ceiling is 1,000,000 major units of the currency; `migrate
-- --max-overdraft EUR=5000.00` (accounts::set_overdraft_ceiling) changes it. Accounts
-- opened before keep their limit: a ceiling applies to limits written from now on.
ALTER TABLE currencies ADD COLUMN max_overdraft_minor BIGINT NULL;
UPDATE currencies SET max_overdraft_minor = 1000000 * (10 ^ minor_units)::bigint;
ALTER TABLE currencies ALTER COLUMN max_overdraft_minor SET NOT NULL;
ALTER TABLE currencies ADD CONSTRAINT currencies_max_overdraft_not_negative CHECK (max_overdraft_minor >= 0);

-- ledger-core refuses a limit above the ceiling before writing; this is the backstop for
-- any other writer. It fires only when the limit or the currency is written, never on
-- the balance updates of the hot paths.
CREATE FUNCTION ledger_check_overdraft_ceiling() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ceiling BIGINT;
BEGIN
    SELECT max_overdraft_minor INTO ceiling FROM currencies WHERE code = NEW.currency;
    IF NEW.overdraft_limit_minor > ceiling THEN
        RAISE EXCEPTION 'overdraft limit % (minor units) of account % is above the % ceiling of %',
            NEW.overdraft_limit_minor, NEW.id, NEW.currency, ceiling
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER accounts_overdraft_ceiling BEFORE INSERT OR UPDATE OF overdraft_limit_minor, currency ON accounts
    FOR EACH ROW EXECUTE FUNCTION ledger_check_overdraft_ceiling();
