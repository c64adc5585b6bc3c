DROP TABLE postings;
DROP TABLE journal_entries;
DROP FUNCTION ledger_check_postings_balanced();
DROP FUNCTION ledger_reject_journal_mutation();
