-- Only on a database without holds: the journal is append-only, so hold entries and
-- their postings (and so the holds_pending accounts) cannot be removed.
DROP TABLE holds;

ALTER TABLE journal_entries DROP CONSTRAINT journal_entries_kind_check;
ALTER TABLE journal_entries ADD CONSTRAINT journal_entries_kind_check
    CHECK (kind IN ('deposit', 'withdrawal', 'transfer', 'payout_settlement', 'payout_return'));

DELETE FROM accounts WHERE system_role = 'holds_pending';
ALTER TABLE accounts DROP CONSTRAINT accounts_system_role_check;
ALTER TABLE accounts ADD CONSTRAINT accounts_system_role_check
    CHECK (system_role IN ('external_funding', 'payouts_in_transit', 'external_settlement'));
