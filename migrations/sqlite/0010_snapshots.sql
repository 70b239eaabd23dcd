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
    version  INTEGER NOT NULL
);
INSERT INTO snapshot_versions (name, version) VALUES ('catalog', 0), ('auth', 0);

CREATE TRIGGER servers_insert_catalog_version AFTER INSERT ON servers
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER servers_update_catalog_version AFTER UPDATE OF slug, name, description, categories, owner_account_id, price_micros, status, secret, timeout_ms, listed, next_price_change_at ON servers
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER servers_delete_catalog_version AFTER DELETE ON servers
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER server_endpoints_insert_catalog_version AFTER INSERT ON server_endpoints
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER server_endpoints_update_catalog_version AFTER UPDATE ON server_endpoints
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER server_endpoints_delete_catalog_version AFTER DELETE ON server_endpoints
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER upstream_tools_insert_catalog_version AFTER INSERT ON upstream_tools
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER upstream_tools_update_catalog_version AFTER UPDATE ON upstream_tools
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER upstream_tools_delete_catalog_version AFTER DELETE ON upstream_tools
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER tool_prices_insert_catalog_version AFTER INSERT ON tool_prices
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER tool_prices_update_catalog_version AFTER UPDATE ON tool_prices
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER tool_prices_delete_catalog_version AFTER DELETE ON tool_prices
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER price_changes_insert_catalog_version AFTER INSERT ON price_changes
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER price_changes_update_catalog_version AFTER UPDATE ON price_changes
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER price_changes_delete_catalog_version AFTER DELETE ON price_changes
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER installs_insert_catalog_version AFTER INSERT ON installs
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER installs_update_catalog_version AFTER UPDATE ON installs
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER installs_delete_catalog_version AFTER DELETE ON installs
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER install_tools_insert_catalog_version AFTER INSERT ON install_tools
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER install_tools_update_catalog_version AFTER UPDATE ON install_tools
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER install_tools_delete_catalog_version AFTER DELETE ON install_tools
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER tool_pins_insert_catalog_version AFTER INSERT ON tool_pins
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER tool_pins_update_catalog_version AFTER UPDATE ON tool_pins
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER tool_pins_delete_catalog_version AFTER DELETE ON tool_pins
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'catalog'; END;
CREATE TRIGGER accounts_insert_auth_version AFTER INSERT ON accounts
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER accounts_update_auth_version AFTER UPDATE ON accounts
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER accounts_delete_auth_version AFTER DELETE ON accounts
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER api_keys_insert_auth_version AFTER INSERT ON api_keys
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER api_keys_update_auth_version AFTER UPDATE ON api_keys
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER api_keys_delete_auth_version AFTER DELETE ON api_keys
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER trust_policies_insert_auth_version AFTER INSERT ON trust_policies
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER trust_policies_update_auth_version AFTER UPDATE ON trust_policies
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER trust_policies_delete_auth_version AFTER DELETE ON trust_policies
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER server_credentials_insert_auth_version AFTER INSERT ON server_credentials
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER server_credentials_update_auth_version AFTER UPDATE ON server_credentials
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER server_credentials_delete_auth_version AFTER DELETE ON server_credentials
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER account_plans_insert_auth_version AFTER INSERT ON account_plans
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER account_plans_update_auth_version AFTER UPDATE ON account_plans
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
CREATE TRIGGER account_plans_delete_auth_version AFTER DELETE ON account_plans
    BEGIN UPDATE snapshot_versions SET version = version + 1 WHERE name = 'auth'; END;
