-- A counter that every change to what the gateway's accounts cache holds moves on, by the
-- triggers below, in the transaction that makes the change (so a reader sees the new value
-- exactly when it can see the change). The cache's refresher reads this one row every 250 ms
-- and reloads orgs, keys, workspaces, members and guardrails only when it moved: an idle
-- gateway, or one under load with no account changes, no longer re-reads every organisation
-- four times a second. Changes made by any instance, or by hand in SQL, move it.
CREATE TABLE accounts_version (
    id      SMALLINT PRIMARY KEY CHECK (id = 1),
    version BIGINT NOT NULL
);

INSERT INTO accounts_version (id, version) VALUES (1, 0);

CREATE FUNCTION move_accounts_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts_version SET version = version + 1;
    RETURN NULL;
END
$$;

CREATE TRIGGER orgs_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON orgs
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();

CREATE TRIGGER api_keys_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();

CREATE TRIGGER workspaces_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON workspaces
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();

CREATE TRIGGER members_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON members
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();

CREATE TRIGGER guardrails_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON guardrails
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();

CREATE TRIGGER guardrail_keys_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON guardrail_keys
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();

CREATE TRIGGER guardrail_members_moves_accounts_version AFTER INSERT OR UPDATE OR DELETE ON guardrail_members
    FOR EACH STATEMENT EXECUTE FUNCTION move_accounts_version();
