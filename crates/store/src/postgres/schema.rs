//! The tables, as numbered migrations applied in order when the store connects.
//!
//! `schema_migrations` records each version applied; connecting applies the missing ones in one
//! transaction, under an advisory lock, so that nodes starting together apply each once and a
//! failed migration leaves nothing half-done. A migration is never edited once released: a change
//! is a new one. Never drops a column that holds data to keep.

use tokio_postgres::Client;

use crate::Result;

/// The version connecting brings the schema to.
pub const SCHEMA_VERSION: i32 = 3;

/// The advisory lock migrations run under (any constant the application uses for nothing else).
const MIGRATION_LOCK: i64 = 0x7469_6469_6e67_7301;

/// The migrations, by version. Foreign keys are enforced: `ON DELETE CASCADE` takes a device's
/// copies, receipts and keys with it, a message's copies, and an account's devices.
/// Millisecond times are `bigint`; ids and keys `bytea`.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "
CREATE SEQUENCE account_ids;
CREATE TABLE accounts (
    id bigint PRIMARY KEY,
    pseudonym bytea NOT NULL UNIQUE,
    previous_pseudonym bytea UNIQUE,
    key_version bigint NOT NULL,
    created_at bigint NOT NULL
);
CREATE TABLE devices (
    id bytea PRIMARY KEY,
    account_id bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    added bigint GENERATED ALWAYS AS IDENTITY,
    public_key bytea NOT NULL,
    identity_key bytea,
    signing_key bytea,
    voucher_by bytea,
    voucher_signature bytea,
    fallback_key bytea,
    fallback_signature bytea,
    missed bigint NOT NULL DEFAULT 0,
    contact_token_hash bytea,
    created_at bigint NOT NULL
);
CREATE INDEX devices_by_account ON devices(account_id, added);
CREATE TABLE one_time_keys (
    device_id bytea NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    public_key bytea NOT NULL,
    signature bytea NOT NULL,
    PRIMARY KEY (device_id, public_key)
);
CREATE SEQUENCE queue_positions;
CREATE TABLE messages (
    seq bigint PRIMARY KEY,
    sender_device bytea NOT NULL,
    msg_id bytea NOT NULL,
    sender_account bigint NOT NULL,
    receiver_account bigint NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    sent_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    delivered boolean NOT NULL DEFAULT false,
    UNIQUE (sender_device, msg_id)
);
CREATE INDEX messages_by_expiry ON messages(expires_at, seq);
CREATE INDEX messages_by_receiver ON messages(receiver_account);
CREATE INDEX messages_by_sender_account ON messages(sender_account);
CREATE TABLE copies (
    device_id bytea NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    seq bigint NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    to_receiver boolean NOT NULL,
    discarded boolean NOT NULL DEFAULT false,
    payload bytea NOT NULL,
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX copies_by_message ON copies(seq);
CREATE TABLE withdrawn (
    sender_device bytea NOT NULL,
    msg_id bytea NOT NULL,
    expires_at bigint NOT NULL,
    delivered boolean NOT NULL,
    PRIMARY KEY (sender_device, msg_id)
);
CREATE INDEX withdrawn_by_expiry ON withdrawn(expires_at);
CREATE TABLE receipts (
    device_id bytea NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    msg_id bytea NOT NULL,
    kind smallint NOT NULL,
    expires_at bigint NOT NULL,
    PRIMARY KEY (device_id, msg_id)
);
CREATE INDEX receipts_by_expiry ON receipts(expires_at);
CREATE TABLE codes (
    pseudonym bytea PRIMARY KEY,
    live_hash bytea,
    live_expires_at bigint,
    live_attempts bigint,
    sent_at bytea NOT NULL
);
",
    ),
    // Copies stored from now on are sealed under the key chain (`seal`); those stored before
    // are read as they are. The chain's record: its name, its hour and that hour's check value, no key.
    (
        2,
        "
ALTER TABLE copies ADD COLUMN sealed boolean NOT NULL DEFAULT false;
ALTER TABLE copies ALTER COLUMN sealed SET DEFAULT true;
CREATE TABLE key_chain (
    id smallint PRIMARY KEY CHECK (id = 1),
    chain_id bytea NOT NULL,
    epoch bigint NOT NULL,
    check_value bytea NOT NULL
);
",
    ),
    // What each sending account has in each device's queue, kept by a trigger on every insert
    // and delete of a copy (cascades included): a send reads its limits from a few rows instead
    // of counting the queue, which made every send cost as much as the queue is long. A copy
    // names its sending account itself, since a cascade from `messages` deletes it after its
    // message. Bytes are counted as sent (what sealing adds, 49, left out).
    (
        3,
        "
ALTER TABLE copies ADD COLUMN sender_account bigint;
UPDATE copies c SET sender_account = m.sender_account FROM messages m WHERE m.seq = c.seq;
ALTER TABLE copies ALTER COLUMN sender_account SET NOT NULL;
CREATE TABLE queue_usage (
    device_id bytea NOT NULL,
    sender_account bigint NOT NULL,
    copies bigint NOT NULL,
    bytes bigint NOT NULL,
    PRIMARY KEY (device_id, sender_account)
);
CREATE INDEX queue_usage_by_sender ON queue_usage(sender_account);
INSERT INTO queue_usage (device_id, sender_account, copies, bytes)
    SELECT device_id, sender_account, count(*),
           sum(length(payload) - CASE WHEN sealed THEN 49 ELSE 0 END)
    FROM copies GROUP BY device_id, sender_account;
CREATE FUNCTION count_queue_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO queue_usage (device_id, sender_account, copies, bytes)
        VALUES (NEW.device_id, NEW.sender_account, 1,
                length(NEW.payload) - CASE WHEN NEW.sealed THEN 49 ELSE 0 END)
        ON CONFLICT (device_id, sender_account) DO UPDATE
            SET copies = queue_usage.copies + 1, bytes = queue_usage.bytes + excluded.bytes;
        RETURN NEW;
    END IF;
    UPDATE queue_usage
        SET copies = copies - 1,
            bytes = bytes - (length(OLD.payload) - CASE WHEN OLD.sealed THEN 49 ELSE 0 END)
        WHERE device_id = OLD.device_id AND sender_account = OLD.sender_account;
    DELETE FROM queue_usage
        WHERE device_id = OLD.device_id AND sender_account = OLD.sender_account AND copies <= 0;
    RETURN OLD;
END
$$;
CREATE TRIGGER copies_count_queue_usage AFTER INSERT OR DELETE ON copies
    FOR EACH ROW EXECUTE FUNCTION count_queue_usage();
",
    ),
];

/// Applies the migrations the database lacks.
pub(super) async fn migrate(client: &mut Client) -> Result<()> {
    let txn = client.transaction().await?;
    txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    txn.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let row = txn
        .query_one(
            "SELECT coalesce(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?;
    let applied: i32 = row.try_get(0)?;
    for (version, statements) in MIGRATIONS {
        if *version <= applied {
            continue;
        }
        txn.batch_execute(statements).await?;
        txn.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
    }
    txn.commit().await?;
    Ok(())
}
