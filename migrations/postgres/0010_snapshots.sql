-- Change versions of the in-memory snapshots (issue 7): one counter per snapshot domain,
-- bumped by triggers on every write to a table that snapshot is built from, so a write
-- by any process (the CLI on the same database, another replica) is seen by every
-- marketplace process's poller (store::versions, every 250 ms) and its caches are
-- rebuilt within one second. Tables written on every call (ledger_*, calls,
-- usage_counters, server_health, probe_results, ...) carry no trigger.
--   catalog: servers (every column the call path and tools/list read, not
--            tools_fetched_at/updated_at), server_endpoints, upstream_tools, tool_prices,
--            price_changes, installs, install_tools, tool_pins
--   auth:    accounts, api_keys, trust_policies, server_credentials, account_plans

CREATE TABLE snapshot_versions (
    name     TEXT PRIMARY KEY,
    version  BIGINT NOT NULL
);
INSERT INTO snapshot_versions (name, version) VALUES ('catalog', 0), ('auth', 0);

-- Statement-level: one bump per statement, whatever the number of rows.
CREATE FUNCTION mkt_bump_snapshot_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE snapshot_versions SET version = version + 1 WHERE name = TG_ARGV[0];
    RETURN NULL;
END;
$$;

CREATE TRIGGER servers_catalog_version AFTER INSERT OR UPDATE OF slug, name, description, categories, owner_account_id, price_micros, status, secret, timeout_ms, listed, next_price_change_at OR DELETE ON servers
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER servers_catalog_version_truncate AFTER TRUNCATE ON servers
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER server_endpoints_catalog_version AFTER INSERT OR UPDATE OR DELETE ON server_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER server_endpoints_catalog_version_truncate AFTER TRUNCATE ON server_endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER upstream_tools_catalog_version AFTER INSERT OR UPDATE OR DELETE ON upstream_tools
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER upstream_tools_catalog_version_truncate AFTER TRUNCATE ON upstream_tools
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER tool_prices_catalog_version AFTER INSERT OR UPDATE OR DELETE ON tool_prices
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER tool_prices_catalog_version_truncate AFTER TRUNCATE ON tool_prices
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER price_changes_catalog_version AFTER INSERT OR UPDATE OR DELETE ON price_changes
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER price_changes_catalog_version_truncate AFTER TRUNCATE ON price_changes
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER installs_catalog_version AFTER INSERT OR UPDATE OR DELETE ON installs
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER installs_catalog_version_truncate AFTER TRUNCATE ON installs
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER install_tools_catalog_version AFTER INSERT OR UPDATE OR DELETE ON install_tools
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER install_tools_catalog_version_truncate AFTER TRUNCATE ON install_tools
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER tool_pins_catalog_version AFTER INSERT OR UPDATE OR DELETE ON tool_pins
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER tool_pins_catalog_version_truncate AFTER TRUNCATE ON tool_pins
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('catalog');
CREATE TRIGGER accounts_auth_version AFTER INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER accounts_auth_version_truncate AFTER TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER api_keys_auth_version AFTER INSERT OR UPDATE OR DELETE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER api_keys_auth_version_truncate AFTER TRUNCATE ON api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER trust_policies_auth_version AFTER INSERT OR UPDATE OR DELETE ON trust_policies
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER trust_policies_auth_version_truncate AFTER TRUNCATE ON trust_policies
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER server_credentials_auth_version AFTER INSERT OR UPDATE OR DELETE ON server_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER server_credentials_auth_version_truncate AFTER TRUNCATE ON server_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER account_plans_auth_version AFTER INSERT OR UPDATE OR DELETE ON account_plans
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
CREATE TRIGGER account_plans_auth_version_truncate AFTER TRUNCATE ON account_plans
    FOR EACH STATEMENT EXECUTE FUNCTION mkt_bump_snapshot_version('auth');
