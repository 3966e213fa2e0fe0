/*-------------------------------------------------------------------------
 *
 * dwh_session_mode.c
 *	  What kind of session writes the warehouse: one restoring a dump, one
 *	  in a READ COMMITTED transaction.
 *
 * A restore (pg_restore, or a script of pg_dump run by psql) sets
 * check_function_bodies off for its whole session, whatever its options.
 * It brings back as they were dumped what dwh otherwise maintains (the
 * user tags and their events) and what it accepted under the settings of
 * the server dumped (an order of more items than dwh.max_order_items
 * allows here): while it does, the tags are not maintained and the limit
 * is not applied again.  Any role can set check_function_bodies, though,
 * and a database owner can set it for every session of the database
 * (ALTER DATABASE ... SET), a superuser's too.  So a session restores only
 * if it set check_function_bodies off itself (SET, as the restores do, or
 * in its connection's options), and if its role, the one outside any
 * SECURITY DEFINER function, could write the tags a restore writes.  The
 * roles that the README's recipes create (a loader, a tagger) cannot, and
 * the workers never restore (dwh_worker_settings).
 *
 * dwh writes only in READ COMMITTED transactions: a batch waits for the
 * dictionary and tag locks, and must then read DDS and the marts as they
 * are once it holds them.  An older snapshot (REPEATABLE READ, SERIALIZABLE)
 * would count against a warehouse that has changed since, and leave the
 * marts wrong.  Nor with session_replication_role replica, under which
 * the triggers that carry STG into DDS do not fire.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "commands/dbcommands.h"
#include "commands/trigger.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/guc_tables.h"
#include "utils/lsyscache.h"

#include "dwh_session_mode.h"
#include "dwh_settings.h"
#include "dwh_worker.h"

/*
 * Was check_function_bodies set by the session itself (SET, or its
 * connection's options), not by the database's or the role's settings?
 */
static bool
function_bodies_set_by_session(void)
{
	struct config_generic **vars = get_guc_variables();
	int			n = GetNumConfigOptions();
	int			i;

	for (i = 0; i < n; i++)
		if (strcmp(vars[i]->name, "check_function_bodies") == 0)
			return vars[i]->source == PGC_S_SESSION ||
				vars[i]->source == PGC_S_CLIENT;
	return false;
}

/*
 * dwh_session_restores
 *		Does this session restore a dump?  check_function_bodies off, set by
 *		the session, and a role that may insert into cdm.user_tags_held.
 */
bool
dwh_session_restores(void)
{
	Oid			cdm;
	Oid			held;

	if (check_function_bodies || !function_bodies_set_by_session())
		return false;
	cdm = get_namespace_oid("cdm", true);
	held = OidIsValid(cdm) ? get_relname_relid("user_tags_held", cdm) : InvalidOid;
	if (!OidIsValid(held))
		return false;
	return pg_class_aclcheck(held, GetOuterUserId(), ACL_INSERT) == ACLCHECK_OK;
}

/*
 * dwh_require_read_committed
 *		Refuse to write the warehouse in a transaction that reads from one
 *		snapshot.
 */
void
dwh_require_read_committed(void)
{
	bool		restoring;

	if (!IsolationUsesXactSnapshot())
		return;
	/* A restore gets its isolation from the database's settings. */
	restoring = dwh_session_restores();
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_TRANSACTION_STATE),
			 errmsg("cannot write the warehouse in a %s transaction",
					IsolationIsSerializable() ? "SERIALIZABLE" : "REPEATABLE READ"),
			 errdetail("dwh carries every write into DDS and the marts as they are once its locks are held, which a snapshot taken before would not show."),
			 restoring ?
			 errhint("This session restores a dump: restore with PGOPTIONS='-c default_transaction_isolation=read\\ committed', or without a default_transaction_isolation set for the database.") :
			 errhint("Use a READ COMMITTED transaction (SET TRANSACTION ISOLATION LEVEL READ COMMITTED).")));
}

/*
 * dwh_require_triggers
 *		Refuse to ingest where the triggers of STG do not fire.
 */
void
dwh_require_triggers(void)
{
	if (SessionReplicationRole != SESSION_REPLICATION_ROLE_REPLICA)
		return;
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("cannot ingest with session_replication_role set to replica"),
			 errdetail("The triggers that check STG's rows and carry them into DDS and the marts do not fire in such a session."),
			 errhint("SET session_replication_role = origin.")));
}

PG_FUNCTION_INFO_V1(dwh_tags_restoring);

/*
 * dwh.tags_restoring() returns boolean
 *
 * Does this session restore a dump, so that the tags are restored rather
 * than maintained?
 */
Datum
dwh_tags_restoring(PG_FUNCTION_ARGS)
{
	PG_RETURN_BOOL(dwh_session_restores());
}

PG_FUNCTION_INFO_V1(dwh_refuse_restore_served);

/*
 * dwh.refuse_restore_served() returns trigger
 *
 * BEFORE INSERT statement trigger of the tables a dump holds: a restore
 * into the database the workers serve is refused.  A worker there writes
 * while the restore loads: the Kafka workers apply orders from the offsets
 * restored before STG is (their rows take the ids of the rows the restore
 * then loads, whose COPY fails: orders lost), or from the start of the
 * topic before the offsets come; the Redis worker writes the users the
 * restore loads; an expiry pass revokes the windowed tags of a warehouse
 * restored in part, with event ids the restored events hold.
 */
Datum
dwh_refuse_restore_served(PG_FUNCTION_ARGS)
{
	char	   *database;
	bool		kafka;
	bool		redis;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("dwh.refuse_restore_served() must be called as a trigger")));
	if (!dwh_workers_registered || !dwh_session_restores())
		PG_RETURN_POINTER(NULL);
	database = get_database_name(MyDatabaseId);
	if (database == NULL || dwh_database == NULL ||
		strcmp(database, dwh_database) != 0)
		PG_RETURN_POINTER(NULL);

	kafka = dwh_kafka_brokers != NULL && dwh_kafka_brokers[0] != '\0';
	redis = (dwh_redis_url != NULL && dwh_redis_url[0] != '\0') ||
		(dwh_redis_url_file != NULL && dwh_redis_url_file[0] != '\0');
	if (!kafka && !redis && dwh_tags_expire_interval == 0)
		PG_RETURN_POINTER(NULL);

	/* No value in the text: a message naming a secret setting is masked. */
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("cannot restore the warehouse into the database that the dwh workers serve (dwh.database)"),
			 kafka ?
			 errdetail("dwh.kafka_brokers is set: the Kafka workers would apply orders from the offsets this restore loads into tables it has not loaded yet.") :
			 redis ?
			 errdetail("dwh.redis_url or dwh.redis_url_file is set: the Redis worker would write the users and restaurants this restore loads.") :
			 errdetail("dwh.tags_expire_interval is not 0: the tags worker would revoke the windowed tags of a warehouse restored in part."),
			 errhint("Restore into a database that dwh.database does not name, then set dwh.database to it and reload; or first empty dwh.kafka_brokers, dwh.redis_url and dwh.redis_url_file, set dwh.tags_expire_interval to 0 and reload.")));
	PG_RETURN_POINTER(NULL);
}
