-- A counter that every change to what the gateway's accounts cache holds moves on, by the
-- triggers below, in the transaction that makes the change (so a reader sees the new value
-- exactly when it can see the change). The cache's refresher reads this one row every 250 ms
-- and reloads orgs, keys, workspaces, members and guardrails only when it moved: an idle
-- gateway, or one under load with no account changes, no longer re-reads every organisation
-- four times a second. Changes made by any instance, or by hand in SQL, move it.
CREATE TABLE accounts_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
) STRICT;

INSERT INTO accounts_version (id, version) VALUES (1, 0);

CREATE TRIGGER orgs_insert_moves_accounts_version AFTER INSERT ON orgs
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER orgs_update_moves_accounts_version AFTER UPDATE ON orgs
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER orgs_delete_moves_accounts_version AFTER DELETE ON orgs
BEGIN UPDATE accounts_version SET version = version + 1; END;

CREATE TRIGGER api_keys_insert_moves_accounts_version AFTER INSERT ON api_keys
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER api_keys_update_moves_accounts_version AFTER UPDATE ON api_keys
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER api_keys_delete_moves_accounts_version AFTER DELETE ON api_keys
BEGIN UPDATE accounts_version SET version = version + 1; END;

CREATE TRIGGER workspaces_insert_moves_accounts_version AFTER INSERT ON workspaces
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER workspaces_update_moves_accounts_version AFTER UPDATE ON workspaces
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER workspaces_delete_moves_accounts_version AFTER DELETE ON workspaces
BEGIN UPDATE accounts_version SET version = version + 1; END;

CREATE TRIGGER members_insert_moves_accounts_version AFTER INSERT ON members
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER members_update_moves_accounts_version AFTER UPDATE ON members
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER members_delete_moves_accounts_version AFTER DELETE ON members
BEGIN UPDATE accounts_version SET version = version + 1; END;

CREATE TRIGGER guardrails_insert_moves_accounts_version AFTER INSERT ON guardrails
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER guardrails_update_moves_accounts_version AFTER UPDATE ON guardrails
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER guardrails_delete_moves_accounts_version AFTER DELETE ON guardrails
BEGIN UPDATE accounts_version SET version = version + 1; END;

CREATE TRIGGER guardrail_keys_insert_moves_accounts_version AFTER INSERT ON guardrail_keys
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER guardrail_keys_update_moves_accounts_version AFTER UPDATE ON guardrail_keys
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER guardrail_keys_delete_moves_accounts_version AFTER DELETE ON guardrail_keys
BEGIN UPDATE accounts_version SET version = version + 1; END;

CREATE TRIGGER guardrail_members_insert_moves_accounts_version AFTER INSERT ON guardrail_members
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER guardrail_members_update_moves_accounts_version AFTER UPDATE ON guardrail_members
BEGIN UPDATE accounts_version SET version = version + 1; END;
CREATE TRIGGER guardrail_members_delete_moves_accounts_version AFTER DELETE ON guardrail_members
BEGIN UPDATE accounts_version SET version = version + 1; END;
