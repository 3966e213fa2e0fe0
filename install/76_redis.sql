-- Redis: the keys the dictionary worker mirrors, and the queue of ids that
-- new orders name.

CREATE TABLE dwh.redis_keys (
    key           text COLLATE "C" PRIMARY KEY,
    kind          text NOT NULL CHECK (kind IN ('user', 'restaurant', 'unknown')),
    state         text NOT NULL CHECK (state IN ('new', 'mirrored', 'missing', 'refused', 'excluded')),
    value_hash    bytea,
    reason        text,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    changed_at    timestamptz
);
CREATE INDEX redis_keys_new_idx ON dwh.redis_keys (key) WHERE state = 'new';
COMMENT ON TABLE dwh.redis_keys IS 'Every Redis key the dictionary worker mirrors: the user and restaurant ids of DDS, and the keys found by SCAN';
COMMENT ON COLUMN dwh.redis_keys.key IS 'Redis key: a user or restaurant id';
COMMENT ON COLUMN dwh.redis_keys.kind IS 'user or restaurant (from the value''s shape once read, from the hub that named it before), unknown for a key found by SCAN and not read yet';
COMMENT ON COLUMN dwh.redis_keys.state IS 'new (not read yet), mirrored (its value is in stg.users or stg.restaurants), missing (Redis holds no string under it), refused (its value is in dwh.dead_letters), excluded (dwh.redis_key_pattern does not match it: never asked; or Redis''s ACL refuses it, NOPERM: asked on each refresh)';
COMMENT ON COLUMN dwh.redis_keys.value_hash IS '128-bit hash of the value last read: a refresh that reads the same value writes nothing, and the same refused value is dead-lettered once';
COMMENT ON COLUMN dwh.redis_keys.reason IS 'Why the value was refused (state refused) or the key is not read (state excluded)';
COMMENT ON COLUMN dwh.redis_keys.first_seen_at IS 'When the key was first named by an order, found by SCAN or found in DDS';
COMMENT ON COLUMN dwh.redis_keys.changed_at IS 'When the state or the value last changed';

-- A Redis key found by SCAN that cannot be a text key (not valid UTF-8, a
-- NUL byte, longer than 128 bytes) is dead-lettered with source_key NULL
-- and the key in raw.  Every refresh pass finds it again: this index keeps
-- one dead letter per such key.
CREATE UNIQUE INDEX dead_letters_redis_key_idx
    ON dwh.dead_letters (raw_sha256)
    WHERE source = 'redis' AND source_key IS NULL;

-- Ids of users and restaurants new to DDS, for the worker to read.  A
-- queue: the worker empties it every second (and compares the hubs with
-- dwh.redis_keys on every refresh, so nothing is lost if it is).  No key:
-- concurrent order batches never wait on each other here, and the
-- duplicates a restore may add (the hubs' COPY fires the trigger) are
-- harmless.
CREATE TABLE dwh.redis_wanted (
    key   text NOT NULL,
    kind  text NOT NULL
);
COMMENT ON TABLE dwh.redis_wanted IS 'Queue of user and restaurant ids new to DDS, emptied by the Redis worker into dwh.redis_keys';
COMMENT ON COLUMN dwh.redis_wanted.key IS 'User or restaurant id';
COMMENT ON COLUMN dwh.redis_wanted.kind IS 'user or restaurant';

CREATE FUNCTION dwh.redis_queue_keys() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $fn$
BEGIN
    IF TG_ARGV[0] = 'user' THEN
        INSERT INTO dwh.redis_wanted (key, kind) SELECT user_id, 'user' FROM inserted;
    ELSE
        INSERT INTO dwh.redis_wanted (key, kind) SELECT restaurant_id, 'restaurant' FROM inserted;
    END IF;
    RETURN NULL;
END
$fn$;
COMMENT ON FUNCTION dwh.redis_queue_keys() IS
    'AFTER INSERT statement trigger of dds.h_user and dds.h_restaurant: queues the new ids for the Redis worker';

CREATE TRIGGER redis_wanted
    AFTER INSERT ON dds.h_user
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.redis_queue_keys('user');

CREATE TRIGGER redis_wanted
    AFTER INSERT ON dds.h_restaurant
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION dwh.redis_queue_keys('restaurant');
