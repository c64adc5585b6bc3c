-- Currencies we can hold, with their ISO 4217 minor-unit scale.
-- ledger-core's `Currency` table must list exactly these (a test compares them).
CREATE TABLE currencies (
    code        TEXT PRIMARY KEY CHECK (code ~ '^[A-Z]{3}$'),
    minor_units SMALLINT NOT NULL CHECK (minor_units BETWEEN 0 AND 4)
);

INSERT INTO currencies (code, minor_units) VALUES
    ('AUD', 2), ('BHD', 3), ('BRL', 2), ('CAD', 2), ('CHF', 2), ('CLP', 0), ('CNY', 2),
    ('CZK', 2), ('DKK', 2), ('EUR', 2), ('GBP', 2), ('HKD', 2), ('HUF', 2), ('INR', 2),
    ('ISK', 0), ('JOD', 3), ('JPY', 0), ('KRW', 0), ('KWD', 3), ('MXN', 2), ('NOK', 2),
    ('NZD', 2), ('OMR', 3), ('PLN', 2), ('SEK', 2), ('SGD', 2), ('TND', 3), ('USD', 2),
    ('ZAR', 2);

-- Customer accounts store their balance and are locked (FOR UPDATE) to change it.
-- System accounts (where money enters, waits in transit, and leaves) have no stored
-- balance: their balance is the sum of their postings. Storing it would turn every
-- system account into one hot row that serialises all traffic in a currency.
CREATE TABLE accounts (
    id                    BIGSERIAL PRIMARY KEY,
    owner                 TEXT NOT NULL CHECK (length(owner) BETWEEN 1 AND 200),
    currency              TEXT NOT NULL REFERENCES currencies (code),
    kind                  TEXT NOT NULL DEFAULT 'customer' CHECK (kind IN ('customer', 'system')),
    system_role           TEXT NULL CHECK (system_role IN ('external_funding', 'payouts_in_transit', 'external_settlement')),
    balance_minor         BIGINT NULL,
    overdraft_limit_minor BIGINT NOT NULL DEFAULT 0 CHECK (overdraft_limit_minor >= 0),
    status                TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'closed')),
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- Target of the composite foreign keys that pin a posting's currency to its account's.
    CONSTRAINT accounts_id_currency_key UNIQUE (id, currency),
    CONSTRAINT accounts_one_system_role_per_currency UNIQUE (system_role, currency),
    CONSTRAINT accounts_kind_shape CHECK (
        (kind = 'system') = (system_role IS NOT NULL)
        AND (kind = 'customer') = (balance_minor IS NOT NULL)
    ),
    -- The floor: zero, or minus the overdraft limit. The code checks it first and
    -- returns InsufficientFunds; this is the backstop that no code path can skip.
    CONSTRAINT accounts_balance_floor CHECK (balance_minor >= -overdraft_limit_minor)
);

INSERT INTO accounts (owner, currency, kind, system_role)
SELECT 'system:' || r.role, c.code, 'system', r.role
FROM currencies c
CROSS JOIN (VALUES ('external_funding'), ('payouts_in_transit'), ('external_settlement')) AS r (role)
ORDER BY c.code, r.role;
