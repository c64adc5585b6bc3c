DROP TRIGGER payouts_no_truncate ON payouts;
DROP TRIGGER payouts_kept ON payouts;
DROP TRIGGER withdrawals_no_truncate ON withdrawals;
DROP TRIGGER withdrawals_kept ON withdrawals;
DROP FUNCTION ledger_keep_queue_rows();

DROP TRIGGER payouts_references_updated ON payouts;
DROP TRIGGER payouts_references_inserted ON payouts;
DROP TRIGGER withdrawals_references_updated ON withdrawals;
DROP TRIGGER withdrawals_references_inserted ON withdrawals;
DROP FUNCTION ledger_check_queue_references();
DROP FUNCTION ledger_refuse_reference(text, text, text);

ALTER TABLE payouts ADD CONSTRAINT payouts_withdrawal_id_fkey
    FOREIGN KEY (withdrawal_id) REFERENCES withdrawals (id);
ALTER TABLE payouts ADD CONSTRAINT payouts_resolution_entry_id_fkey
    FOREIGN KEY (resolution_entry_id) REFERENCES journal_entries (id);
ALTER TABLE payouts ADD CONSTRAINT payouts_account_currency_fkey
    FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency);
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_entry_id_fkey
    FOREIGN KEY (entry_id) REFERENCES journal_entries (id);
ALTER TABLE withdrawals ADD CONSTRAINT withdrawals_account_currency_fkey
    FOREIGN KEY (account_id, currency) REFERENCES accounts (id, currency);
