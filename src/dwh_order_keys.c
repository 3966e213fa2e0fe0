/*-------------------------------------------------------------------------
 *
 * dwh_order_keys.c
 *	  What a batch of order versions names and refers to: the C steps of
 *	  dwh.claim_order_keys() (install/40_products.sql).
 *
 * dwh.order_namings() reduces the batch's order items to the newest naming
 * and the oldest version of each dish; dwh.namings_rename() says whether
 * those change the current name of some dish; dwh.order_keys_missing()
 * says which of the keys that batches share (dish, restaurant and user
 * hubs, dish-restaurant pairs, the dishes' rows of dds.product_namings)
 * DDS lacks.  All were statements of the claim: an aggregate over
 * every item, a lateral lookup per dish, and one upsert per table that,
 * once the keys exist (every batch but the first few), inserts nothing.
 * Here they are a walk over the payloads and lookups in primary keys; the
 * claim inserts only what is missing, with the statements it had.
 *
 * The payloads are checked orders (dwh_order_payload_check): the ids and
 * names read here are strings.  Anything else is refused with 22023.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/transam.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "funcapi.h"
#include "lib/qunique.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dwh_columns.h"
#include "dwh_key_probe.h"
#include "dwh_uuid.h"

PG_FUNCTION_INFO_V1(dwh_order_namings);
PG_FUNCTION_INFO_V1(dwh_namings_rename);
PG_FUNCTION_INFO_V1(dwh_order_keys_missing);

/* A string of a payload, not copied. */
typedef struct PayloadString
{
	const char *val;
	int			len;
} PayloadString;

/* One item's naming of a dish. */
typedef struct ItemNaming
{
	PayloadString id;
	PayloadString name;
	Timestamp	version;
} ItemNaming;

/* A key of a hub or link, with the business keys it is the hash of. */
typedef struct SharedKey
{
	pg_uuid_t	key;
	PayloadString first;		/* the hub's business key; a pair's restaurant */
	PayloadString second;		/* a pair's dish */
} SharedKey;

/* Growing array of SharedKey. */
typedef struct SharedKeys
{
	SharedKey  *keys;
	int			n;
	int			allocated;
} SharedKeys;

/* The order of text under COLLATE "C": bytes, then length. */
static int
string_cmp(const PayloadString *a, const PayloadString *b)
{
	int			c = memcmp(a->val, b->val, Min(a->len, b->len));

	if (c != 0)
		return c;
	return (a->len > b->len) - (a->len < b->len);
}

/* Dish first; then the newest version, then the greatest name. */
static int
naming_cmp(const void *a, const void *b)
{
	const ItemNaming *x = a;
	const ItemNaming *y = b;
	int			c = string_cmp(&x->id, &y->id);

	if (c != 0)
		return c;
	if (x->version != y->version)
		return x->version > y->version ? -1 : 1;
	return string_cmp(&y->name, &x->name);
}

/*
 * Keep the newest naming of each dish among namings[0..n-1], sorted by dish
 * id byte-wise; returns how many are left.  When earliest is not NULL, it
 * receives the oldest version of each dish kept (room for n).
 */
static int
newest_per_dish(ItemNaming *namings, int n, Timestamp *earliest)
{
	int			kept = 0;

	if (n == 0)
		return 0;
	qsort(namings, n, sizeof(ItemNaming), naming_cmp);
	for (int k = 0; k < n; k++)
	{
		/* Versions of one dish come newest first: the last is the oldest. */
		if (kept > 0 && string_cmp(&namings[kept - 1].id, &namings[k].id) == 0)
		{
			if (earliest)
				earliest[kept - 1] = namings[k].version;
			continue;
		}
		if (earliest)
			earliest[kept] = namings[k].version;
		namings[kept++] = namings[k];
	}
	return kept;
}

static int
shared_key_cmp(const void *a, const void *b)
{
	return dwh_uuid_cmp(&((const SharedKey *) a)->key,
						&((const SharedKey *) b)->key);
}

/* The elements of a one-dimensional array argument, none of them null. */
static int
array_elements(ArrayType *arr, Oid elemtype, const char *name, Datum **values)
{
	int16		typlen;
	bool		typbyval;
	char		typalign;
	bool	   *nulls;
	int			n;

	if (ARR_NDIM(arr) > 1)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("%s must be a one-dimensional array", name)));
	get_typlenbyvalalign(elemtype, &typlen, &typbyval, &typalign);
	deconstruct_array(arr, elemtype, typlen, typbyval, typalign, values, &nulls,
					  &n);
	for (int i = 0; i < n; i++)
		if (nulls[i])
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("%s must not contain nulls", name)));
	return n;
}

/* The string field key of object obj; path names obj in the error. */
static PayloadString
string_field(JsonbContainer *obj, const char *key, const char *path, int i)
{
	JsonbValue	v;
	PayloadString s;

	if (!JsonContainerIsObject(obj) ||
		getKeyJsonValueFromContainer(obj, key, strlen(key), &v) == NULL ||
		v.type != jbvString)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload %d has no string %s%s", i + 1, path, key),
				 errdetail("Only checked order payloads are claimed.")));
	s.val = v.val.string.val;
	s.len = v.val.string.len;
	return s;
}

/* The container of field key of object obj (an object or an array). */
static JsonbContainer *
container_field(JsonbContainer *obj, const char *key, bool array, int i)
{
	JsonbValue	v;

	if (!JsonContainerIsObject(obj) ||
		getKeyJsonValueFromContainer(obj, key, strlen(key), &v) == NULL ||
		v.type != jbvBinary ||
		(array ? !JsonContainerIsArray(v.val.binary.data) :
		 !JsonContainerIsObject(v.val.binary.data)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload %d has no %s %s", i + 1,
						array ? "array" : "object", key),
				 errdetail("Only checked order payloads are claimed.")));
	return v.val.binary.data;
}

/* The order items of a payload and their number. */
static JsonbContainer *
order_items(JsonbContainer *payload, int i, int *count)
{
	JsonbContainer *items = container_field(payload, "order_items", true, i);

	*count = JsonContainerSize(items);
	return items;
}

/* Item j of the order items of payload i. */
static JsonbContainer *
order_item(JsonbContainer *items, int j, int i)
{
	JsonbValue *item = getIthJsonbValueFromContainer(items, j);

	if (item->type != jbvBinary)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("payload %d has an order item that is not an object",
						i + 1),
				 errdetail("Only checked order payloads are claimed.")));
	return item->val.binary.data;
}

/* The column as an array, or null when it is empty. */
static Datum
column_or_null(DwhColumn *col, bool *isnull)
{
	*isnull = (col->n == 0);
	return col->n == 0 ? (Datum) 0 : dwh_column_array(col);
}

/* The text[] of strings[0..n-1], or null when n is 0. */
static Datum
text_array(PayloadString *strings, int n, bool *isnull)
{
	DwhColumn	col;

	dwh_column_init(&col, TEXTOID, n);
	for (int i = 0; i < n; i++)
		dwh_column_add(&col,
					   PointerGetDatum(cstring_to_text_with_len(strings[i].val,
																strings[i].len)),
					   false);
	return column_or_null(&col, isnull);
}

static HeapTuple
result_tuple(FunctionCallInfo fcinfo, Datum *values, bool *nulls)
{
	TupleDesc	tupdesc;

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	return heap_form_tuple(BlessTupleDesc(tupdesc), values, nulls);
}

/* The timestamp[] of times[0..n-1], or null when n is 0. */
static Datum
timestamp_array(Timestamp *times, int n, bool *isnull)
{
	DwhColumn	col;

	dwh_column_init(&col, TIMESTAMPOID, n);
	for (int i = 0; i < n; i++)
		dwh_column_add(&col, TimestampGetDatum(times[i]), false);
	return column_or_null(&col, isnull);
}

/*
 * dwh.order_namings(payloads jsonb[], versions timestamp[],
 *					 OUT ids text[], OUT names text[],
 *					 OUT item_versions timestamp[],
 *					 OUT first_versions timestamp[])
 *
 * The newest naming of each dish among the items of the order versions
 * (payloads[i] of version versions[i]): the greatest version, then the
 * greatest name byte-wise, as the current name of a dish is chosen
 * (docs/data-rule.md); and the oldest version that names it.  Sorted by
 * dish id byte-wise; all null when there is no item.
 */
Datum
dwh_order_namings(PG_FUNCTION_ARGS)
{
	Datum	   *payloads;
	Datum	   *versions;
	int			n;
	ItemNaming *namings = NULL;
	int			n_namings = 0;
	int			allocated = 0;
	PayloadString *ids;
	PayloadString *names;
	Timestamp  *times;
	Timestamp  *first_times;
	int			n_dishes;
	Datum		values[4];
	bool		nulls[4];

	n = array_elements(PG_GETARG_ARRAYTYPE_P(0), JSONBOID, "payloads", &payloads);
	if (array_elements(PG_GETARG_ARRAYTYPE_P(1), TIMESTAMPOID, "versions",
					   &versions) != n)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("payloads and versions must have as many elements")));

	for (int i = 0; i < n; i++)
	{
		int			count;
		JsonbContainer *items = order_items(&DatumGetJsonbP(payloads[i])->root,
											i, &count);

		if (n_namings + count > allocated)
		{
			allocated = Max(64, 2 * (n_namings + count));
			namings = namings ? repalloc(namings, sizeof(ItemNaming) * allocated) :
				palloc(sizeof(ItemNaming) * allocated);
		}
		for (int j = 0; j < count; j++)
		{
			JsonbContainer *item = order_item(items, j, i);
			ItemNaming *x = &namings[n_namings++];

			x->id = string_field(item, "id", "order_items[].", i);
			x->name = string_field(item, "name", "order_items[].", i);
			x->version = DatumGetTimestamp(versions[i]);
		}
	}

	first_times = palloc(sizeof(Timestamp) * Max(n_namings, 1));
	n_dishes = newest_per_dish(namings, n_namings, first_times);
	ids = palloc(sizeof(PayloadString) * Max(n_dishes, 1));
	names = palloc(sizeof(PayloadString) * Max(n_dishes, 1));
	times = palloc(sizeof(Timestamp) * Max(n_dishes, 1));
	for (int k = 0; k < n_dishes; k++)
	{
		ids[k] = namings[k].id;
		names[k] = namings[k].name;
		times[k] = namings[k].version;
	}

	values[0] = text_array(ids, n_dishes, &nulls[0]);
	values[1] = text_array(names, n_dishes, &nulls[1]);
	values[2] = timestamp_array(times, n_dishes, &nulls[2]);
	values[3] = timestamp_array(first_times, n_dishes, &nulls[3]);
	PG_RETURN_DATUM(HeapTupleGetDatum(result_tuple(fcinfo, values, nulls)));
}

/* The string of a text datum, not copied. */
static PayloadString
text_string(Datum d)
{
	text	   *t = DatumGetTextPP(d);
	PayloadString s;

	s.val = VARDATA_ANY(t);
	s.len = VARSIZE_ANY_EXHDR(t);
	return s;
}

/*
 * Does this naming change the current name of its dish?  current is the
 * name of the dish's newest row of dds.s_product_names and current_time
 * the time of the naming it stands for.  It does when it differs and is
 * newer, or as new and greater byte-wise: the current name is the
 * greatest naming in (time, name) order.
 */
static bool
renames(const ItemNaming *naming, const PayloadString *current,
		Timestamp current_time)
{
	int			c = string_cmp(&naming->name, current);

	if (c == 0)
		return false;
	return naming->version > current_time ||
		(naming->version == current_time && c > 0);
}

/* Column attname of dds.<table>, or an error. */
static AttrNumber
column_of(Oid relid, const char *table, const char *attname)
{
	AttrNumber	att = get_attnum(relid, attname);

	if (att == InvalidAttrNumber)
		elog(ERROR, "dds.%s has no column %s", table, attname);
	return att;
}

/*
 * dwh.namings_rename(ids text[], names text[], versions timestamp[])
 *		returns boolean
 *
 * Would these namings (ids[i] named names[i] at versions[i], the newest of
 * each dish counting) change the current name of some dish, or name one
 * for the first time?  The current name is the one of the dish's newest
 * row in dds.s_product_names that the statement's snapshot sees.  When
 * that row is the dish's order naming row, which sits at or before the
 * newest order naming (docs/data-rule.md), the time it stands for is that
 * naming's, from dds.product_namings.  False when an argument is null.
 */
Datum
dwh_namings_rename(PG_FUNCTION_ARGS)
{
	Datum	   *ids;
	Datum	   *names;
	Datum	   *versions;
	int			n;
	ItemNaming *namings;
	Oid			dds;
	Oid			names_relid;
	Oid			bounds_relid;
	Relation	names_rel;
	Relation	bounds_rel;
	AttrNumber	name_att;
	AttrNumber	load_dt_att;
	AttrNumber	load_src_att;
	AttrNumber	last_order_att;
	DwhKeyProbe names_probe;
	DwhKeyProbe bounds_probe;
	bool		found = false;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_BOOL(false);
	n = array_elements(PG_GETARG_ARRAYTYPE_P(0), TEXTOID, "ids", &ids);
	if (array_elements(PG_GETARG_ARRAYTYPE_P(1), TEXTOID, "names", &names) != n ||
		array_elements(PG_GETARG_ARRAYTYPE_P(2), TIMESTAMPOID, "versions",
					   &versions) != n)
		ereport(ERROR,
				(errcode(ERRCODE_ARRAY_SUBSCRIPT_ERROR),
				 errmsg("ids, names and versions must have as many elements")));
	namings = palloc(sizeof(ItemNaming) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		namings[i].id = text_string(ids[i]);
		namings[i].name = text_string(names[i]);
		namings[i].version = DatumGetTimestamp(versions[i]);
	}
	n = newest_per_dish(namings, n, NULL);
	if (n == 0)
		PG_RETURN_BOOL(false);

	dds = get_namespace_oid("dds", false);
	names_relid = get_relname_relid("s_product_names", dds);
	bounds_relid = get_relname_relid("product_namings", dds);
	name_att = column_of(names_relid, "s_product_names", "name");
	load_dt_att = column_of(names_relid, "s_product_names", "load_dt");
	load_src_att = column_of(names_relid, "s_product_names", "load_src");
	last_order_att = column_of(bounds_relid, "product_namings", "last_order_dt");

	names_rel = table_open(names_relid, AccessShareLock);
	bounds_rel = table_open(bounds_relid, AccessShareLock);
	dwh_key_probe_begin(&names_probe, names_rel, GetActiveSnapshot());
	dwh_key_probe_begin(&bounds_probe, bounds_rel, GetActiveSnapshot());
	for (int i = 0; i < n && !found; i++)
	{
		pg_uuid_t	key;
		TupleTableSlot *row;
		PayloadString current;
		PayloadString source;
		Timestamp	current_time;
		bool		isnull;

		dwh_hash_key(namings[i].id.val, namings[i].id.len, &key);
		row = dwh_key_probe_last(&names_probe, &key);
		if (row == NULL)
		{
			found = true;		/* named for the first time */
			break;
		}
		current = text_string(slot_getattr(row, name_att, &isnull));
		current_time = DatumGetTimestamp(slot_getattr(row, load_dt_att, &isnull));
		source = text_string(slot_getattr(row, load_src_att, &isnull));
		if (source.len == strlen("stg.order_events") &&
			memcmp(source.val, "stg.order_events", source.len) == 0)
		{
			TupleTableSlot *bounds = dwh_key_probe_last(&bounds_probe, &key);
			Datum		last;

			if (bounds != NULL)
			{
				last = slot_getattr(bounds, last_order_att, &isnull);
				if (!isnull)
					current_time = DatumGetTimestamp(last);
			}
		}
		found = renames(&namings[i], &current, current_time);
	}
	dwh_key_probe_end(&bounds_probe);
	dwh_key_probe_end(&names_probe);
	table_close(bounds_rel, NoLock);	/* held until commit, as a query would */
	table_close(names_rel, NoLock);
	PG_RETURN_BOOL(found);
}

/* Order of SharedKey by its business keys. */
static int
business_key_cmp(const void *a, const void *b)
{
	const SharedKey *x = a;
	const SharedKey *y = b;
	int			c = string_cmp(&x->first, &y->first);

	return c != 0 ? c : string_cmp(&x->second, &y->second);
}

static void
shared_key_add(SharedKeys *set, PayloadString first, PayloadString second)
{
	if (set->n == set->allocated)
	{
		set->allocated = Max(64, 2 * set->allocated);
		set->keys = set->keys ? repalloc(set->keys, sizeof(SharedKey) * set->allocated) :
			palloc(sizeof(SharedKey) * set->allocated);
	}
	set->keys[set->n].first = first;
	set->keys[set->n].second = second;
	set->n++;
}

/*
 * Keep one of each business key in set, and hash it: a hub's key, or with
 * pairs a dish-restaurant link's (first the restaurant, second the dish).
 * Hashing after the duplicates are gone: a batch names each dish many
 * times, and a SHA-1 costs more than the comparisons.
 */
static void
hash_distinct(SharedKeys *set, bool pairs)
{
	pg_uuid_t	restaurant_key;

	if (set->n == 0)
		return;
	qsort(set->keys, set->n, sizeof(SharedKey), business_key_cmp);
	set->n = qunique(set->keys, set->n, sizeof(SharedKey), business_key_cmp);
	for (int i = 0; i < set->n; i++)
	{
		SharedKey  *k = &set->keys[i];
		pg_uuid_t	product_key;

		if (!pairs)
		{
			dwh_hash_key(k->first.val, k->first.len, &k->key);
			continue;
		}
		if (i == 0 || string_cmp(&set->keys[i - 1].first, &k->first) != 0)
			dwh_hash_key(k->first.val, k->first.len, &restaurant_key);
		dwh_hash_key(k->second.val, k->second.len, &product_key);
		dwh_link_key(&product_key, &restaurant_key, &k->key);
	}
}

/*
 * Keep in set only the keys that table dds.<table> lacks, sorted.
 *
 * A key is there when a row of a committed transaction or of this one has
 * it (SnapshotDirty): rows are never deleted from these tables and their
 * keys never change.  A row that a transaction still in progress inserted
 * does not count: the claim's upsert of that key waits for it, as it did
 * for every key before this lookup.  Nor does one it deletes, unless
 * updated: the rows of dds.product_namings are updated by every batch
 * (never deleted, their key never changed), and a batch that took such a
 * row for missing would wait, at step 2 of the lock order, for the
 * commit of every batch naming the same dishes.
 */
static void
keep_missing(SharedKeys *set, const char *table, bool updated)
{
	Relation	rel;
	DwhKeyProbe probe;
	SnapshotData dirty;
	int			kept = 0;

	if (set->n == 0)
		return;
	qsort(set->keys, set->n, sizeof(SharedKey), shared_key_cmp);

	InitDirtySnapshot(dirty);
	rel = table_open(get_relname_relid(table, get_namespace_oid("dds", false)),
					 AccessShareLock);
	dwh_key_probe_begin(&probe, rel, &dirty);
	for (int i = 0; i < set->n; i++)
	{
		bool		there = dwh_key_probe(&probe, &set->keys[i].key) &&
		!TransactionIdIsValid(dirty.xmin) &&
		(updated || !TransactionIdIsValid(dirty.xmax));

		if (!there)
			set->keys[kept++] = set->keys[i];
	}
	dwh_key_probe_end(&probe);
	table_close(rel, NoLock);	/* held until commit, as a query would */
	set->n = kept;
}

/* The first (second) business keys of set, as a text[] or null. */
static Datum
business_keys(SharedKeys *set, bool second, bool *isnull)
{
	PayloadString *strings = palloc(sizeof(PayloadString) * Max(set->n, 1));

	for (int i = 0; i < set->n; i++)
		strings[i] = second ? set->keys[i].second : set->keys[i].first;
	return text_array(strings, set->n, isnull);
}

/*
 * dwh.order_keys_missing(payloads jsonb[],
 *						  OUT products text[], OUT restaurants text[],
 *						  OUT users text[], OUT pair_restaurants text[],
 *						  OUT pair_products text[], OUT namings text[])
 *
 * The business keys of the dishes, restaurants and users of the orders
 * whose hubs DDS lacks, the (restaurant, dish) pairs it has no link for,
 * and the dishes that have no row in dds.product_namings; each in key
 * order, null when none is missing.
 */
Datum
dwh_order_keys_missing(PG_FUNCTION_ARGS)
{
	Datum	   *payloads;
	int			n;
	SharedKeys	products = {0};
	SharedKeys	restaurants = {0};
	SharedKeys	users = {0};
	SharedKeys	pairs = {0};
	SharedKeys	namings;
	PayloadString none = {"", 0};
	Datum		values[6];
	bool		nulls[6];

	n = array_elements(PG_GETARG_ARRAYTYPE_P(0), JSONBOID, "payloads", &payloads);
	for (int i = 0; i < n; i++)
	{
		JsonbContainer *payload = &DatumGetJsonbP(payloads[i])->root;
		PayloadString restaurant_id;
		JsonbContainer *items;
		int			count;

		restaurant_id = string_field(container_field(payload, "restaurant", false, i),
									 "id", "restaurant.", i);
		shared_key_add(&restaurants, restaurant_id, none);
		shared_key_add(&users,
					   string_field(container_field(payload, "user", false, i),
									"id", "user.", i),
					   none);
		items = order_items(payload, i, &count);
		for (int j = 0; j < count; j++)
		{
			PayloadString product_id = string_field(order_item(items, j, i), "id",
													"order_items[].", i);

			shared_key_add(&products, product_id, none);
			shared_key_add(&pairs, restaurant_id, product_id);
		}
	}
	hash_distinct(&products, false);
	hash_distinct(&restaurants, false);
	hash_distinct(&users, false);
	hash_distinct(&pairs, true);
	namings = products;
	if (products.n > 0)
	{
		namings.keys = palloc(sizeof(SharedKey) * products.n);
		memcpy(namings.keys, products.keys, sizeof(SharedKey) * products.n);
		namings.allocated = products.n;
	}

	/* In the order the claim writes them. */
	keep_missing(&products, "h_product", false);
	keep_missing(&restaurants, "h_restaurant", false);
	keep_missing(&users, "h_user", false);
	keep_missing(&pairs, "l_product_restaurant", false);
	keep_missing(&namings, "product_namings", true);

	values[0] = business_keys(&products, false, &nulls[0]);
	values[1] = business_keys(&restaurants, false, &nulls[1]);
	values[2] = business_keys(&users, false, &nulls[2]);
	values[3] = business_keys(&pairs, false, &nulls[3]);
	values[4] = business_keys(&pairs, true, &nulls[4]);
	values[5] = business_keys(&namings, false, &nulls[5]);
	PG_RETURN_DATUM(HeapTupleGetDatum(result_tuple(fcinfo, values, nulls)));
}
