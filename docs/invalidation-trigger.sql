-- Invalidate cachesvc entries from the database itself: every sidecar that LISTENs on
-- the channel ([invalidation].postgres_url / postgres_channel, default
-- "cachesvc_invalidate") removes the key from every tier.
--
-- Example for a table "users" whose rows are cached under "user:<id>" and tagged
-- "users". NOTIFY is transactional: the event goes out when the transaction commits,
-- never for a rolled-back change. A payload is limited to 8000 bytes.

CREATE OR REPLACE FUNCTION cachesvc_invalidate_user() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    row_id text := COALESCE(NEW.id, OLD.id)::text;
BEGIN
    PERFORM pg_notify(
        'cachesvc_invalidate',
        json_build_object(
            'keys', json_build_array('user:' || row_id),
            'sent_at', extract(epoch FROM clock_timestamp())
        )::text
    );
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS users_cachesvc_invalidate ON users;
CREATE TRIGGER users_cachesvc_invalidate
    AFTER UPDATE OR DELETE ON users
    FOR EACH ROW EXECUTE FUNCTION cachesvc_invalidate_user();
