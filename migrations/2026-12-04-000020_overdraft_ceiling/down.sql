DROP TRIGGER accounts_overdraft_ceiling ON accounts;
DROP FUNCTION ledger_check_overdraft_ceiling();
ALTER TABLE currencies DROP COLUMN max_overdraft_minor;
