-- One composite foreign key instead of two: a payout's currency must be its account's
-- (stronger than before), and each payout insert runs one check fewer.
ALTER TABLE payouts DROP CONSTRAINT payouts_account_id_fkey;
ALTER TABLE payouts DROP CONSTRAINT payouts_currency_fkey;
ALTER TABLE payouts ADD CONSTRAINT payouts_account_currency_fkey
    FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency);
