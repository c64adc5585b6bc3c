DROP TABLE payouts;
DROP TABLE withdrawals;
DROP FUNCTION ledger_notify_withdrawals();
