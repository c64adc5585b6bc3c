ALTER TABLE payouts DROP CONSTRAINT payouts_account_currency_fkey;
ALTER TABLE payouts ADD CONSTRAINT payouts_currency_fkey FOREIGN KEY (currency) REFERENCES currencies (code);
ALTER TABLE payouts ADD CONSTRAINT payouts_account_id_fkey FOREIGN KEY (account_id) REFERENCES accounts (id);
