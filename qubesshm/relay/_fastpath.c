/* The relay's fast path, compiled: the loops of qubesshm/relay/fastpath.py's FastPath
 * (requests and events) and the table work of their common cases, in C.
 *
 * It works on the very Python tables the rest of the proxy uses (ObjectMap's dict of
 * WaylandObjects, UpstreamIds' dicts of _Slots and ids, its free heap and set), so the
 * full path and this core share one state. Every check the Python fast path makes is
 * made here in the same order; a message that fails one stops the loop at its offset,
 * before any state changed, for the full path to handle with its own error texts. The
 * table operations do their common cases natively and call the Python method for the
 * rest (the errors, libwayland's skipped ids, running out of ids), so the state they
 * leave is the Python code's by construction. Anything the core does not recognise
 * (an object of another type in a table, an attribute of an unexpected type) hands
 * the rest of the buffer to the pure-Python fast path, which shares the same tables.
 *
 * Slot attributes of the dataclasses are read and written at their member offsets,
 * found from their member descriptors when the core first starts (and checked: a
 * change in those classes makes the core refuse to start, never read amiss).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 8
#define DISPLAY_ID 1u
#define CLIENT_ID_MAX 0xFEFFFFFFu
#define SERVER_ID_MIN 0xFF000000u
#define MAP_MAX_OBJECTS 0x00F00000u
/* Object arguments a message may have for the core to take it (else: Python). */
#define MAX_PATCHES 64

#ifndef Py_T_OBJECT_EX
#define Py_T_OBJECT_EX T_OBJECT_EX
#endif

/* -- what the core learns of the Python classes once ------------------------------ */

static int ready;
static PyTypeObject *WaylandObject_T, *Slot_T, *MessageSpec_T, *InterfaceSpec_T,
    *WordPlan_T;
static Py_ssize_t off_obj_id, off_obj_interface, off_obj_version, off_obj_alive;
static Py_ssize_t off_slot_client_id, off_slot_owner, off_slot_destroyed;
static Py_ssize_t off_spec_relay_plan, off_spec_since;
static Py_ssize_t off_iface_requests, off_iface_events, off_iface_name;
static Py_ssize_t off_plan_native;
static PyObject *py_request_plan, *py_event_plan, *py_FastPath, *heappush;
/* The Python methods the table operations fall back on (the functions of the classes,
   never an override: the tests route a subclass's methods through this core). */
static PyObject *om_create_by_client, *om_create_by_server, *om_destroyed, *om_delete_id,
    *ids_add_client_object_py, *ids_claim_py, *ids_delete_id_py, *ids_destroyed_py;
/* interned attribute names */
static PyObject *s_objects, *s_client_next, *s_refuse, *s_to_upstream, *s_slots, *s_free,
    *s_free_set, *s_next, *s_diverged, *s_client_highest, *s_interfaces, *s_add,
    *s_requests, *s_events;

#define SLOT(o, off) (*(PyObject **)((char *)(o) + (off)))

static int
member_offset(PyTypeObject *type, const char *name, Py_ssize_t *out)
{
    PyObject *d = PyObject_GetAttrString((PyObject *)type, name);
    if (d == NULL)
        return -1;
    if (!Py_IS_TYPE(d, &PyMemberDescr_Type)
            || ((PyMemberDescrObject *)d)->d_member->type != Py_T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot the compiled core can use",
                     type->tp_name, name);
        Py_DECREF(d);
        return -1;
    }
    *out = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_DECREF(d);
    return 0;
}

static PyTypeObject *
import_type(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return NULL;
    PyObject *t = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    if (t == NULL)
        return NULL;
    if (!PyType_Check(t)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a class", module, name);
        Py_DECREF(t);
        return NULL;
    }
    return (PyTypeObject *)t;
}

static PyObject *
import_attr(const char *module, const char *name)
{
    PyObject *m = PyImport_ImportModule(module);
    if (m == NULL)
        return NULL;
    PyObject *a = PyObject_GetAttrString(m, name);
    Py_DECREF(m);
    return a;
}

static PyObject *
method_of(const char *module, const char *cls, const char *name)
{
    PyObject *type = (PyObject *)import_type(module, cls);
    if (type == NULL)
        return NULL;
    PyObject *f = PyObject_GetAttrString(type, name);
    Py_DECREF(type);
    return f;
}

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return -1

static int
set_up(void)
{
    if (ready)
        return 0;
    INTERN(s_objects, "_objects");
    INTERN(s_client_next, "_client_next");
    INTERN(s_refuse, "refuse_skipped_ids");
    INTERN(s_to_upstream, "_to_upstream");
    INTERN(s_slots, "_slots");
    INTERN(s_free, "_free");
    INTERN(s_free_set, "_free_set");
    INTERN(s_next, "_next");
    INTERN(s_diverged, "_diverged");
    INTERN(s_client_highest, "_client_highest");
    INTERN(s_interfaces, "interfaces");
    INTERN(s_add, "add");
    INTERN(s_requests, "requests");
    INTERN(s_events, "events");
    if ((WaylandObject_T = import_type("qubesshm.objects.objectmap", "WaylandObject")) == NULL
        || (Slot_T = import_type("qubesshm.objects.idmap", "_Slot")) == NULL
        || (MessageSpec_T = import_type("qubesshm.wire.protocol", "MessageSpec")) == NULL
        || (InterfaceSpec_T = import_type("qubesshm.wire.protocol", "InterfaceSpec")) == NULL
        || (WordPlan_T = import_type("qubesshm.relay.fastpath", "WordPlan")) == NULL)
        return -1;
    if (member_offset(WaylandObject_T, "id", &off_obj_id)
        || member_offset(WaylandObject_T, "interface", &off_obj_interface)
        || member_offset(WaylandObject_T, "version", &off_obj_version)
        || member_offset(WaylandObject_T, "alive", &off_obj_alive)
        || member_offset(Slot_T, "client_id", &off_slot_client_id)
        || member_offset(Slot_T, "owner", &off_slot_owner)
        || member_offset(Slot_T, "destroyed", &off_slot_destroyed)
        || member_offset(MessageSpec_T, "relay_plan", &off_spec_relay_plan)
        || member_offset(MessageSpec_T, "since", &off_spec_since)
        || member_offset(InterfaceSpec_T, "requests", &off_iface_requests)
        || member_offset(InterfaceSpec_T, "events", &off_iface_events)
        || member_offset(InterfaceSpec_T, "name", &off_iface_name)
        || member_offset(WordPlan_T, "native", &off_plan_native))
        return -1;
    /* Instances made here are as the dataclass __init__ makes them: the types must
       not have one of their own beyond setting these fields, nor a dict. */
    if (WaylandObject_T->tp_dictoffset || Slot_T->tp_dictoffset) {
        PyErr_SetString(PyExc_TypeError, "WaylandObject and _Slot must have slots only");
        return -1;
    }
    if ((py_request_plan = import_attr("qubesshm.relay.fastpath", "request_plan")) == NULL
        || (py_event_plan = import_attr("qubesshm.relay.fastpath", "event_plan")) == NULL
        || (py_FastPath = import_attr("qubesshm.relay.fastpath", "FastPath")) == NULL
        || (heappush = import_attr("heapq", "heappush")) == NULL
        || (om_create_by_client = method_of("qubesshm.objects.objectmap", "ObjectMap",
                                             "create_by_client")) == NULL
        || (om_create_by_server = method_of("qubesshm.objects.objectmap", "ObjectMap",
                                             "create_by_server")) == NULL
        || (om_destroyed = method_of("qubesshm.objects.objectmap", "ObjectMap",
                                      "destroyed")) == NULL
        || (om_delete_id = method_of("qubesshm.objects.objectmap", "ObjectMap",
                                      "delete_id")) == NULL
        || (ids_add_client_object_py = method_of("qubesshm.objects.idmap", "UpstreamIds",
                                                 "add_client_object")) == NULL
        || (ids_claim_py = method_of("qubesshm.objects.idmap", "UpstreamIds", "_claim")) == NULL
        || (ids_delete_id_py = method_of("qubesshm.objects.idmap", "UpstreamIds",
                                         "delete_id")) == NULL
        || (ids_destroyed_py = method_of("qubesshm.objects.idmap", "UpstreamIds",
                                         "destroyed")) == NULL)
        return -1;
    ready = 1;
    return 0;
}

/* -- small helpers ------------------------------------------------------------------ */

static inline uint32_t
rd32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline void
wr32(unsigned char *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

/* An exact int in 0..2**32-1 (ids, versions): 0 and its value in *out, else 1 (the
   caller hands over to Python), -1 with an exception. */
static int
as_u32(PyObject *v, uint32_t *out)
{
    if (!PyLong_CheckExact(v))
        return 1;
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow || x < 0 || x > 0xFFFFFFFFLL)
        return 1;
    *out = (uint32_t)x;
    return 0;
}

/* A borrowed value of dict ``d`` at int key ``k``; NULL when absent (*err set on error). */
static inline PyObject *
get_u32(PyObject *d, uint32_t k, int *err)
{
    PyObject *key = PyLong_FromUnsignedLong(k);
    if (key == NULL) {
        *err = 1;
        return NULL;
    }
    PyObject *v = PyDict_GetItemWithError(d, key);
    Py_DECREF(key);
    if (v == NULL && PyErr_Occurred())
        *err = 1;
    return v;
}

static inline int
truth(PyObject *v)
{
    if (v == Py_True)
        return 1;
    if (v == Py_False)
        return 0;
    return PyObject_IsTrue(v);
}

/* An instance attribute kept in the object's __dict__, borrowed; NULL + error if absent. */
static PyObject *
dict_attr(PyObject *dict, PyObject *name)
{
    PyObject *v = PyDict_GetItemWithError(dict, name);
    if (v == NULL && !PyErr_Occurred())
        PyErr_SetObject(PyExc_AttributeError, name);
    return v;
}

static int
dict_attr_ll(PyObject *dict, PyObject *name, long long *out)
{
    PyObject *v = dict_attr(dict, name);
    if (v == NULL)
        return -1;
    if (!PyLong_CheckExact(v)) {
        PyErr_Format(PyExc_TypeError, "%U is not an int", name);
        return -1;
    }
    *out = PyLong_AsLongLong(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
set_dict_attr_ll(PyObject *dict, PyObject *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL)
        return -1;
    int r = PyDict_SetItem(dict, name, v);
    Py_DECREF(v);
    return r;
}

/* -- the tables of one call ----------------------------------------------------------- */

typedef struct {
    PyObject *objects;   /* the ObjectMap */
    PyObject *ids;       /* the UpstreamIds */
    PyObject *od;        /* ObjectMap.__dict__ */
    PyObject *idd;       /* UpstreamIds.__dict__ */
    PyObject *entries;   /* ObjectMap._objects */
    PyObject *to_upstream, *slots;
} Tables;

static void
tables_close(Tables *t)
{
    Py_CLEAR(t->od);
    Py_CLEAR(t->idd);
    Py_CLEAR(t->entries);
    Py_CLEAR(t->to_upstream);
    Py_CLEAR(t->slots);
}

static PyObject *
instance_dict(PyObject *o)
{
    PyObject *d = PyObject_GenericGetDict(o, NULL);
    if (d != NULL && !PyDict_CheckExact(d)) {
        PyErr_SetString(PyExc_TypeError, "instance __dict__ is not a dict");
        Py_CLEAR(d);
    }
    return d;
}

static PyObject *
owned_dict_attr(PyObject *dict, PyObject *name)
{
    PyObject *v = dict_attr(dict, name);
    if (v == NULL)
        return NULL;
    if (!PyDict_CheckExact(v)) {
        PyErr_Format(PyExc_TypeError, "%U is not a dict", name);
        return NULL;
    }
    Py_INCREF(v);
    return v;
}

/* Either side may be NULL (the table functions the tests call use one). */
static int
tables_open(Tables *t, PyObject *objects, PyObject *ids)
{
    memset(t, 0, sizeof *t);
    t->objects = objects;
    t->ids = ids;
    if (objects != NULL) {
        if ((t->od = instance_dict(objects)) == NULL
            || (t->entries = owned_dict_attr(t->od, s_objects)) == NULL)
            goto fail;
    }
    if (ids != NULL) {
        if ((t->idd = instance_dict(ids)) == NULL
            || (t->to_upstream = owned_dict_attr(t->idd, s_to_upstream)) == NULL
            || (t->slots = owned_dict_attr(t->idd, s_slots)) == NULL)
            goto fail;
    }
    return 0;
fail:
    tables_close(t);
    return -1;
}

/* -- new instances, as their dataclass __init__ makes them --------------------------- */

static PyObject *
new_wayland_object(PyObject *id, PyObject *interface, PyObject *version)
{
    PyObject *o = WaylandObject_T->tp_alloc(WaylandObject_T, 0);
    if (o == NULL)
        return NULL;
    SLOT(o, off_obj_id) = Py_NewRef(id);
    SLOT(o, off_obj_interface) = Py_NewRef(interface);
    SLOT(o, off_obj_version) = Py_NewRef(version);
    SLOT(o, off_obj_alive) = Py_NewRef(Py_True);
    return o;
}

static PyObject *
new_slot(PyObject *client_id)
{
    PyObject *o = Slot_T->tp_alloc(Slot_T, 0);
    if (o == NULL)
        return NULL;
    SLOT(o, off_slot_client_id) = Py_NewRef(client_id);
    SLOT(o, off_slot_owner) = Py_NewRef(Py_None);
    SLOT(o, off_slot_destroyed) = Py_NewRef(Py_False);
    return o;
}

static inline void
set_slot(PyObject *o, Py_ssize_t off, PyObject *v)
{
    PyObject *old = SLOT(o, off);
    SLOT(o, off) = Py_NewRef(v);
    Py_XDECREF(old);
}

/* -- ObjectMap, natively ----------------------------------------------------------- */

/* ObjectMap.accepts_client_id: 1, 0, -1 on error. */
static int
objects_accepts_client_id(Tables *t, uint32_t id)
{
    if (!(1 <= id && id < MAP_MAX_OBJECTS))
        return 0;
    int err = 0;
    if (get_u32(t->entries, id, &err) != NULL)
        return 0;
    if (err)
        return -1;
    PyObject *refuse = dict_attr(t->od, s_refuse);
    if (refuse == NULL)
        return -1;
    int r = truth(refuse);
    if (r <= 0)
        return r < 0 ? -1 : 1;
    long long next;
    if (dict_attr_ll(t->od, s_client_next, &next))
        return -1;
    return id > next ? 0 : 1;
}

/* ObjectMap.create_by_client: a new reference. */
static PyObject *
objects_create_by_client(Tables *t, PyObject *id_obj, PyObject *interface, PyObject *version)
{
    uint32_t id = 0;
    int r = as_u32(id_obj, &id);
    if (r < 0)
        return NULL;
    int accepted = 0;
    if (r == 0 && (accepted = objects_accepts_client_id(t, id)) < 0)
        return NULL;
    if (!accepted) /* an error or an odd id: the Python method's own words */
        return PyObject_CallFunctionObjArgs(om_create_by_client, t->objects, id_obj, interface,
                                          version, NULL);
    long long next;
    if (dict_attr_ll(t->od, s_client_next, &next))
        return NULL;
    if ((long long)id + 1 > next && set_dict_attr_ll(t->od, s_client_next, (long long)id + 1))
        return NULL;
    /* max(next, id + 1) is assigned either way in Python: equal values. */
    PyObject *obj = new_wayland_object(id_obj, interface, version);
    if (obj == NULL)
        return NULL;
    if (PyDict_SetItem(t->entries, id_obj, obj)) {
        Py_DECREF(obj);
        return NULL;
    }
    return obj;
}

static PyObject *
objects_create_by_server(Tables *t, PyObject *id_obj, PyObject *interface, PyObject *version)
{
    uint32_t id;
    int r = as_u32(id_obj, &id);
    if (r < 0)
        return NULL;
    int fallback = r != 0 || id < SERVER_ID_MIN;
    if (!fallback) {
        PyObject *known = PyDict_GetItemWithError(t->entries, id_obj);
        if (known == NULL && PyErr_Occurred())
            return NULL;
        if (known != NULL) {
            if (!Py_IS_TYPE(known, WaylandObject_T))
                fallback = 1;
            else {
                int alive = truth(SLOT(known, off_obj_alive));
                if (alive < 0)
                    return NULL;
                fallback = alive;
            }
        }
    }
    if (fallback)
        return PyObject_CallFunctionObjArgs(om_create_by_server, t->objects, id_obj, interface,
                                          version, NULL);
    PyObject *obj = new_wayland_object(id_obj, interface, version);
    if (obj == NULL)
        return NULL;
    if (PyDict_SetItem(t->entries, id_obj, obj)) {
        Py_DECREF(obj);
        return NULL;
    }
    return obj;
}

/* ObjectMap.destroyed; obj is a WaylandObject. */
static int
objects_destroyed(Tables *t, PyObject *obj, int by_compositor)
{
    if (by_compositor) {
        PyObject *id_obj = SLOT(obj, off_obj_id);
        uint32_t id;
        int r = as_u32(id_obj, &id);
        if (r < 0)
            return -1;
        if (r == 1) {
            PyObject *kw = Py_BuildValue("{sO}", "by_compositor", Py_True);
            if (kw == NULL)
                return -1;
            PyObject *res = NULL;
            PyObject *args = PyTuple_Pack(2, t->objects, obj);
            if (args != NULL)
                res = PyObject_Call(om_destroyed, args, kw);
            Py_XDECREF(args);
            Py_DECREF(kw);
            if (res == NULL)
                return -1;
            Py_DECREF(res);
            return 0;
        }
        if (!(1 <= id && id <= CLIENT_ID_MAX)) {
            /* the compositor freed its own id: pop(obj.id, None) */
            Py_INCREF(id_obj);
            int has = PyDict_Contains(t->entries, id_obj);
            int res = has <= 0 ? has : PyDict_DelItem(t->entries, id_obj);
            Py_DECREF(id_obj);
            return res < 0 ? -1 : 0;
        }
    }
    set_slot(obj, off_obj_alive, Py_False);
    return 0;
}

/* ObjectMap.delete_id: 1 if it knew the id, 0 if not, -1 on error. */
static int
objects_delete_id(Tables *t, PyObject *id_obj)
{
    uint32_t id;
    int r = as_u32(id_obj, &id);
    if (r < 0)
        return -1;
    if (r == 1 || !(1 <= id && id <= CLIENT_ID_MAX) || id == DISPLAY_ID) {
        PyObject *res = PyObject_CallFunctionObjArgs(om_delete_id, t->objects, id_obj, NULL);
        if (res == NULL)
            return -1;
        int b = truth(res);
        Py_DECREF(res);
        return b;
    }
    if (PyDict_DelItem(t->entries, id_obj) == 0)
        return 1;
    if (!PyErr_ExceptionMatches(PyExc_KeyError))
        return -1;
    PyErr_Clear();
    return 0;
}

/* -- UpstreamIds, natively ----------------------------------------------------------- */

/* heapq.heappush(heap, item), its sift done here for a list of ints (the same swaps,
   so the same list), by heapq itself for anything else. */
static int
heap_push(PyObject *heap, PyObject *item)
{
    uint32_t value;
    if (!PyList_CheckExact(heap) || as_u32(item, &value) != 0) {
        if (PyErr_Occurred())
            return -1;
        PyObject *args[2] = {heap, item};
        PyObject *res = PyObject_Vectorcall(heappush, args, 2, NULL);
        Py_XDECREF(res);
        return res == NULL ? -1 : 0;
    }
    if (PyList_Append(heap, item))
        return -1;
    PyObject **items = ((PyListObject *)heap)->ob_item;
    Py_ssize_t pos = PyList_GET_SIZE(heap) - 1;
    while (pos > 0) {
        Py_ssize_t parentpos = (pos - 1) >> 1;
        PyObject *parent = items[parentpos];
        uint32_t parent_value;
        int r = as_u32(parent, &parent_value);
        if (r < 0)
            return -1;
        int less;
        if (r == 0)
            less = value < parent_value;
        else if ((less = PyObject_RichCompareBool(item, parent, Py_LT)) < 0)
            return -1;
        if (!less)
            break;
        /* the comparison ran no Python code for ints; for anything else the list may
           have changed under it, as heapq checks */
        if (r != 0 && (PyList_GET_SIZE(heap) <= pos || ((PyListObject *)heap)->ob_item != items)) {
            PyErr_SetString(PyExc_RuntimeError, "list changed size during iteration");
            return -1;
        }
        items[parentpos] = items[pos];
        items[pos] = parent;
        pos = parentpos;
    }
    return 0;
}

/* UpstreamIds._take_free */
static int
ids_take_free(Tables *t, PyObject *free_set, PyObject *key)
{
    if (PySet_Discard(free_set, key) < 0)
        return -1;
    PyObject *heap = dict_attr(t->idd, s_free);
    if (heap == NULL)
        return -1;
    Py_ssize_t heap_len = PyObject_Length(heap);
    if (heap_len < 0)
        return -1;
    if (heap_len > 2 * PySet_GET_SIZE(free_set) + 64) {
        PyObject *sorted = PySequence_List(free_set);
        if (sorted == NULL)
            return -1;
        if (PyList_Sort(sorted) || PyDict_SetItem(t->idd, s_free, sorted)) {
            Py_DECREF(sorted);
            return -1;
        }
        Py_DECREF(sorted);
    }
    return 0;
}

static PyObject *ids_add_new_client_object(Tables *t, PyObject *client, uint32_t cid);

/* UpstreamIds.add_client_object: the upstream id (a new reference). */
static PyObject *
ids_add_client_object(Tables *t, PyObject *client)
{
    uint32_t cid;
    int r = as_u32(client, &cid);
    if (r < 0)
        return NULL;
    int known = r == 0 ? PyDict_Contains(t->to_upstream, client) : 1;
    if (known < 0)
        return NULL;
    if (known) /* the Python method's error (or an odd id) */
        return PyObject_CallFunctionObjArgs(ids_add_client_object_py, t->ids, client, NULL);
    return ids_add_new_client_object(t, client, cid);
}

/* add_client_object for an id ``cid`` (``client``, an exact int) known to have no
   upstream id yet. */
static PyObject *
ids_add_new_client_object(Tables *t, PyObject *client, uint32_t cid)
{
    int r;
    PyObject *upstream;
    uint32_t upstream_id = cid;
    PyObject *free_set = dict_attr(t->idd, s_free_set);
    if (free_set == NULL)
        return NULL;
    if (!PySet_CheckExact(free_set)) {
        PyErr_SetString(PyExc_TypeError, "UpstreamIds._free_set is not a set");
        return NULL;
    }
    int is_free = PySet_Contains(free_set, client);
    if (is_free < 0)
        return NULL;
    if (is_free) {
        Py_INCREF(free_set);
        r = ids_take_free(t, free_set, client);
        Py_DECREF(free_set);
        if (r)
            return NULL;
        upstream = Py_NewRef(client);
    } else {
        long long next;
        if (dict_attr_ll(t->idd, s_next, &next))
            return NULL;
        if (cid == next && cid < MAP_MAX_OBJECTS) {
            if (set_dict_attr_ll(t->idd, s_next, next + 1))
                return NULL;
            upstream = Py_NewRef(client);
        } else {
            /* skipped ids, or ids that ran ahead: the Python method */
            upstream = PyObject_CallFunctionObjArgs(ids_claim_py, t->ids, client, NULL);
            if (upstream == NULL)
                return NULL;
            r = as_u32(upstream, &upstream_id);
            if (r) {
                if (r > 0)
                    PyErr_SetString(PyExc_ValueError, "an upstream id out of range");
                goto fail;
            }
        }
    }
    long long highest;
    if (dict_attr_ll(t->idd, s_client_highest, &highest))
        goto fail;
    if (cid > highest && set_dict_attr_ll(t->idd, s_client_highest, cid))
        goto fail;
    PyObject *slot = new_slot(client);
    if (slot == NULL)
        goto fail;
    r = PyDict_SetItem(t->slots, upstream, slot);
    Py_DECREF(slot);
    if (r || PyDict_SetItem(t->to_upstream, client, upstream))
        goto fail;
    if (upstream_id != cid) {
        long long diverged;
        if (dict_attr_ll(t->idd, s_diverged, &diverged)
            || set_dict_attr_ll(t->idd, s_diverged, diverged + 1))
            goto fail;
    }
    return upstream;
fail:
    Py_DECREF(upstream);
    return NULL;
}

/* UpstreamIds.destroyed */
static int
ids_destroyed(Tables *t, PyObject *upstream)
{
    uint32_t id;
    int r = as_u32(upstream, &id);
    if (r < 0)
        return -1;
    if (r == 0 && id >= SERVER_ID_MIN)
        return 0;
    PyObject *slot = r == 0 ? PyDict_GetItemWithError(t->slots, upstream) : NULL;
    if (slot == NULL && PyErr_Occurred())
        return -1;
    if (slot == NULL || !Py_IS_TYPE(slot, Slot_T)) {
        PyObject *res = PyObject_CallFunctionObjArgs(ids_destroyed_py, t->ids, upstream, NULL);
        Py_XDECREF(res);
        return res == NULL ? -1 : 0;
    }
    set_slot(slot, off_slot_destroyed, Py_True);
    return 0;
}

static int ids_delete_slot(Tables *t, PyObject *upstream, uint32_t id, PyObject *slot);

/* UpstreamIds.delete_id: the slot (new reference), None, or NULL on error. */
static PyObject *
ids_delete_id(Tables *t, PyObject *upstream)
{
    uint32_t id;
    int r = as_u32(upstream, &id);
    if (r < 0)
        return NULL;
    if (r == 1)
        return PyObject_CallFunctionObjArgs(ids_delete_id_py, t->ids, upstream, NULL);
    if (id == DISPLAY_ID || id >= SERVER_ID_MIN)
        Py_RETURN_NONE;
    PyObject *slot = PyDict_GetItemWithError(t->slots, upstream);
    if (slot == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    if (!Py_IS_TYPE(slot, Slot_T))
        return PyObject_CallFunctionObjArgs(ids_delete_id_py, t->ids, upstream, NULL);
    Py_INCREF(slot);
    if (ids_delete_slot(t, upstream, id, slot)) {
        Py_DECREF(slot);
        return NULL;
    }
    return slot;
}

/* delete_id of ``upstream`` (``id``, neither the display's nor a server id) whose
   _Slot is ``slot``: 0, or -1 on error. */
static int
ids_delete_slot(Tables *t, PyObject *upstream, uint32_t id, PyObject *slot)
{
    if (PyDict_DelItem(t->slots, upstream))
        return -1;
    PyObject *client = SLOT(slot, off_slot_client_id);
    if (client != Py_None && PyDict_DelItem(t->to_upstream, client))
        return -1;
    uint32_t client_id;
    int same;
    if (client == Py_None)
        same = 0;
    else if (as_u32(client, &client_id) == 0)
        same = client_id == id;
    else if (PyErr_Occurred())
        return -1;
    else
        same = PyObject_RichCompareBool(client, upstream, Py_EQ);
    if (same < 0)
        return -1;
    if (!same) {
        long long diverged;
        if (dict_attr_ll(t->idd, s_diverged, &diverged)
            || set_dict_attr_ll(t->idd, s_diverged, diverged - 1))
            return -1;
    }
    PyObject *heap = dict_attr(t->idd, s_free);
    if (heap == NULL || heap_push(heap, upstream))
        return -1;
    PyObject *free_set = dict_attr(t->idd, s_free_set);
    if (free_set == NULL || PySet_Add(free_set, upstream))
        return -1;
    return 0;
}

/* 1 if every id is the same on both connections, 0 if not, -1 on error. */
static int
ids_identical(Tables *t)
{
    long long diverged;
    if (dict_attr_ll(t->idd, s_diverged, &diverged))
        return -1;
    return diverged == 0;
}

/* -- plans: WordPlan, compiled ------------------------------------------------------ */

typedef struct {
    uint32_t index;
    int nullable;
    PyObject *interface; /* a str, or NULL for any */
} ObjectArg;

typedef struct {
    PyObject_HEAD
    Py_ssize_t size;
    long long since;
    int new_id;            /* the word that is a new id, -1 if none */
    PyObject *new_interface;
    int destructor;
    int full_path;
    Py_ssize_t nobjects;
    ObjectArg *objects;
    Py_ssize_t ntail;      /* strings and arrays after the words */
    unsigned char *tail;   /* TAIL_STRING | TAIL_NULLABLE each */
} PlanObject;

enum { TAIL_STRING = 1, TAIL_NULLABLE = 2 };

static void
plan_dealloc(PlanObject *self)
{
    for (Py_ssize_t i = 0; i < self->nobjects; i++)
        Py_XDECREF(self->objects[i].interface);
    PyMem_Free(self->objects);
    PyMem_Free(self->tail);
    Py_XDECREF(self->new_interface);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject Plan_T = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qubesshm.relay._fastpath.Plan",
    .tp_basicsize = sizeof(PlanObject),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A WordPlan as the compiled core reads it.",
};

static int
long_attr(PyObject *o, const char *name, long long *out)
{
    PyObject *v = PyObject_GetAttrString(o, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
bool_attr(PyObject *o, const char *name, int *out)
{
    PyObject *v = PyObject_GetAttrString(o, name);
    if (v == NULL)
        return -1;
    *out = PyObject_IsTrue(v);
    Py_DECREF(v);
    return *out < 0 ? -1 : 0;
}

static PlanObject *
compile_plan(PyObject *spec, PyObject *word_plan)
{
    PlanObject *p = PyObject_New(PlanObject, &Plan_T);
    if (p == NULL)
        return NULL;
    p->objects = NULL;
    p->nobjects = 0;
    p->tail = NULL;
    p->ntail = 0;
    p->new_interface = NULL;
    long long size, new_id, since, body_size;
    PyObject *objects = NULL, *body = NULL, *tail = NULL;
    PyObject *since_obj = SLOT(spec, off_spec_since);
    if (since_obj == NULL || !PyLong_Check(since_obj)) {
        PyErr_SetString(PyExc_TypeError, "MessageSpec.since is not an int");
        goto fail;
    }
    since = PyLong_AsLongLong(since_obj);
    if (since == -1 && PyErr_Occurred())
        goto fail;
    p->since = since;
    if (long_attr(word_plan, "size", &size) || long_attr(word_plan, "new_id", &new_id)
        || bool_attr(word_plan, "destructor", &p->destructor)
        || bool_attr(word_plan, "full_path", &p->full_path))
        goto fail;
    if ((body = PyObject_GetAttrString(word_plan, "body")) == NULL
        || long_attr(body, "size", &body_size))
        goto fail;
    Py_ssize_t words = (Py_ssize_t)((size - HEADER_SIZE) / 4);
    if (size < HEADER_SIZE || size % 4 || body_size != size - HEADER_SIZE
        || new_id < -1 || new_id >= words) {
        PyErr_SetString(PyExc_ValueError, "a WordPlan the compiled core cannot read");
        goto fail;
    }
    p->size = (Py_ssize_t)size;
    p->new_id = (int)new_id;
    if ((p->new_interface = PyObject_GetAttrString(word_plan, "new_interface")) == NULL)
        goto fail;
    if (!PyUnicode_Check(p->new_interface)) {
        PyErr_SetString(PyExc_TypeError, "WordPlan.new_interface is not a str");
        goto fail;
    }
    if ((objects = PyObject_GetAttrString(word_plan, "objects")) == NULL)
        goto fail;
    if (!PyTuple_Check(objects)) {
        PyErr_SetString(PyExc_TypeError, "WordPlan.objects is not a tuple");
        goto fail;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(objects);
    p->objects = PyMem_Calloc(n ? (size_t)n : 1, sizeof(ObjectArg));
    if (p->objects == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(objects, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3) {
            PyErr_SetString(PyExc_TypeError, "WordPlan.objects holds an odd entry");
            goto fail;
        }
        long long index = PyLong_AsLongLong(PyTuple_GET_ITEM(item, 0));
        if (index == -1 && PyErr_Occurred())
            goto fail;
        if (index < 0 || index >= words) {
            PyErr_SetString(PyExc_ValueError, "WordPlan.objects: index out of range");
            goto fail;
        }
        PyObject *iface = PyTuple_GET_ITEM(item, 1);
        if (iface != Py_None && !PyUnicode_Check(iface)) {
            PyErr_SetString(PyExc_TypeError, "WordPlan.objects: interface is not a str");
            goto fail;
        }
        int nullable = PyObject_IsTrue(PyTuple_GET_ITEM(item, 2));
        if (nullable < 0)
            goto fail;
        p->objects[i].index = (uint32_t)index;
        p->objects[i].nullable = nullable;
        p->objects[i].interface = iface == Py_None ? NULL : Py_NewRef(iface);
        p->nobjects = i + 1;
    }
    if ((tail = PyObject_GetAttrString(word_plan, "tail")) == NULL)
        goto fail;
    if (!PyTuple_Check(tail)) {
        PyErr_SetString(PyExc_TypeError, "WordPlan.tail is not a tuple");
        goto fail;
    }
    Py_ssize_t ntail = PyTuple_GET_SIZE(tail);
    p->tail = PyMem_Calloc(ntail ? (size_t)ntail : 1, 1);
    if (p->tail == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < ntail; i++) {
        PyObject *item = PyTuple_GET_ITEM(tail, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_TypeError, "WordPlan.tail holds an odd entry");
            goto fail;
        }
        int is_string = PyObject_IsTrue(PyTuple_GET_ITEM(item, 0));
        int nullable = PyObject_IsTrue(PyTuple_GET_ITEM(item, 1));
        if (is_string < 0 || nullable < 0)
            goto fail;
        p->tail[i] = (unsigned char)((is_string ? TAIL_STRING : 0)
                                     | (nullable ? TAIL_NULLABLE : 0));
    }
    p->ntail = ntail;
    Py_DECREF(tail);
    Py_DECREF(objects);
    Py_DECREF(body);
    return p;
fail:
    Py_XDECREF(tail);
    Py_XDECREF(objects);
    Py_XDECREF(body);
    Py_DECREF(p);
    return NULL;
}

/* Whether the plan's strings and arrays fill buf[pos:end] exactly, as ``tail_fits`` in
   fastpath.py says: a non-null string NUL-terminated with no other NUL, zero padding. */
static int
tail_fits(const PlanObject *plan, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end)
{
    for (Py_ssize_t i = 0; i < plan->ntail; i++) {
        if (end - pos < 4)
            return 0;
        uint32_t length = rd32(buf + pos);
        pos += 4;
        if (length == 0) {
            if ((plan->tail[i] & TAIL_STRING) && !(plan->tail[i] & TAIL_NULLABLE))
                return 0;
            continue;
        }
        unsigned long long padded = ((unsigned long long)length + 3) & ~3ULL;
        if (padded > (unsigned long long)(end - pos))
            return 0;
        const unsigned char *text = buf + pos;
        if ((plan->tail[i] & TAIL_STRING)
                && (text[length - 1] != 0 || memchr(text, 0, length - 1) != NULL))
            return 0;
        for (unsigned long long k = length; k < padded; k++)
            if (text[k])
                return 0;
        pos += (Py_ssize_t)padded;
    }
    return pos == end;
}

/* Whether a message of ``size`` bytes at buf[pos] has the plan's layout. */
static inline int
plan_fits(const PlanObject *plan, const unsigned char *buf, Py_ssize_t pos, Py_ssize_t size)
{
    if (!plan->ntail)
        return size == plan->size;
    return size >= plan->size && tail_fits(plan, buf, pos + plan->size, pos + size);
}

enum { STEP_OK = 0, STEP_STOP = 1, STEP_PYTHON = 2, STEP_ERROR = -1 };

/* The compiled plan of ``spec`` (borrowed) in *out, or STEP_STOP when the message is
   not for the fast path; STEP_PYTHON for anything unexpected. */
static int
plan_of(PyObject *spec, PyObject *make, PlanObject **out)
{
    if (!Py_IS_TYPE(spec, MessageSpec_T))
        return STEP_PYTHON;
    PyObject *plan = SLOT(spec, off_spec_relay_plan);
    if (plan == NULL)
        return STEP_PYTHON;
    if (!Py_IS_TYPE(plan, WordPlan_T)) {
        if (plan == Py_False)
            return STEP_STOP; /* what request_plan / event_plan would answer again */
        PyObject *made = PyObject_CallOneArg(make, spec);
        if (made == NULL)
            return STEP_ERROR;
        Py_DECREF(made); /* the spec keeps it */
        if (made == Py_None)
            return STEP_STOP;
        plan = SLOT(spec, off_spec_relay_plan);
        if (plan == NULL || !Py_IS_TYPE(plan, WordPlan_T))
            return STEP_PYTHON;
    }
    PyObject *native = SLOT(plan, off_plan_native);
    if (native == NULL || !Py_IS_TYPE(native, &Plan_T)) {
        PlanObject *compiled = compile_plan(spec, plan);
        if (compiled == NULL)
            return STEP_ERROR;
        set_slot(plan, off_plan_native, (PyObject *)compiled);
        Py_DECREF(compiled);
        native = (PyObject *)compiled;
    }
    *out = (PlanObject *)native;
    return STEP_OK;
}

/* -- the output of one call ------------------------------------------------------- */

/* What the Python code would have handed to ``out.add`` by now (``committed``), kept
   here and handed over in one call: Outbox.add joins segments without fds. */
typedef struct {
    unsigned char *data;
    Py_ssize_t len, cap;
} OutBuf;

static int
outbuf_put(OutBuf *o, const void *data, Py_ssize_t n)
{
    if (o->len + n > o->cap) {
        Py_ssize_t cap = o->cap ? o->cap : 1024;
        while (cap < o->len + n)
            cap *= 2;
        unsigned char *grown = PyMem_Realloc(o->data, (size_t)cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        o->data = grown;
        o->cap = cap;
    }
    memcpy(o->data + o->len, data, (size_t)n);
    o->len += n;
    return 0;
}

static int
outbox_add(PyObject *out, const void *data, Py_ssize_t n)
{
    PyObject *bytes = PyBytes_FromStringAndSize(data, n);
    if (bytes == NULL)
        return -1;
    PyObject *fds = PyList_New(0);
    if (fds == NULL) {
        Py_DECREF(bytes);
        return -1;
    }
    PyObject *res = PyObject_CallMethodObjArgs(out, s_add, bytes, fds, NULL);
    Py_DECREF(bytes);
    Py_DECREF(fds);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

/* Hand ``committed`` over (after an error as well, keeping the error). */
static int
outbuf_flush(OutBuf *o, PyObject *out)
{
    int r = 0;
    if (o->len) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        r = outbox_add(out, o->data, o->len);
        if (type != NULL) {
            if (r == 0)
                PyErr_Restore(type, value, tb);
            else {
                Py_XDECREF(type);
                Py_XDECREF(value);
                Py_XDECREF(tb);
            }
            r = -1;
        }
        o->len = 0;
    }
    return r;
}

/* A message relayed with other ids: the run before it, then the rewritten message. */
static int
emit_rewritten(OutBuf *o, const unsigned char *buf, Py_ssize_t run, Py_ssize_t pos,
               Py_ssize_t size, uint32_t header_id, const uint32_t *patch_index,
               const uint32_t *patch_value, int npatch)
{
    if (run < pos && outbuf_put(o, buf + run, pos - run))
        return -1;
    Py_ssize_t start = o->len;
    if (outbuf_put(o, buf + pos, size))
        return -1;
    unsigned char *m = o->data + start;
    wr32(m, header_id);
    for (int i = 0; i < npatch; i++)
        wr32(m + HEADER_SIZE + 4 * (Py_ssize_t)patch_index[i], patch_value[i]);
    return 0;
}

/* -- FastPath -------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *protocol;
    PyObject *objects;
    PyObject *ids;
    int intercepting;
    Py_ssize_t max_message_size;
    PyObject *delete_id_spec;
    PyObject *python; /* the pure-Python FastPath on the same tables */
} FastPathObject;

static int
fastpath_traverse(FastPathObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->protocol);
    Py_VISIT(self->objects);
    Py_VISIT(self->ids);
    Py_VISIT(self->delete_id_spec);
    Py_VISIT(self->python);
    return 0;
}

static int
fastpath_clear(FastPathObject *self)
{
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->objects);
    Py_CLEAR(self->ids);
    Py_CLEAR(self->delete_id_spec);
    Py_CLEAR(self->python);
    return 0;
}

static void
fastpath_dealloc(FastPathObject *self)
{
    PyObject_GC_UnTrack(self);
    fastpath_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
fastpath_init(FastPathObject *self, PyObject *args, PyObject *kwds)
{
    if (set_up())
        return -1;
    /* The Python fast path on the same tables: it checks the arguments as its own. */
    PyObject *python = PyObject_Call(py_FastPath, args, kwds);
    if (python == NULL)
        return -1;
    static char *kwlist[] = {"protocol", "objects", "ids", "intercepting",
                             "max_message_size", NULL};
    PyObject *protocol, *objects, *ids;
    int intercepting = 0;
    Py_ssize_t max_size = 0;
    PyObject *delete_id = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|$pn", kwlist, &protocol, &objects,
                                     &ids, &intercepting, &max_size)
        || (delete_id = PyObject_GetAttrString(python, "_delete_id")) == NULL) {
        Py_DECREF(python);
        return -1;
    }
    fastpath_clear(self);
    self->protocol = Py_NewRef(protocol);
    self->objects = Py_NewRef(objects);
    self->ids = Py_NewRef(ids);
    self->intercepting = intercepting;
    self->max_message_size = max_size;
    self->delete_id_spec = delete_id;
    self->python = python;
    return 0;
}

/* The rest of ``buf`` from ``pos`` through the pure-Python fast path. */
static PyObject *
hand_to_python(FastPathObject *self, PyObject *method, PyObject *buf, Py_ssize_t pos,
               PyObject *out)
{
    PyObject *m = PyObject_GetAttr(self->python, method);
    if (m == NULL)
        return NULL;
    PyObject *res = PyObject_CallFunction(m, "OnO", buf, pos, out);
    Py_DECREF(m);
    return res;
}

typedef struct {
    Py_buffer view;
    const unsigned char *buf;
    Py_ssize_t end;
    Py_ssize_t pos;
    Py_ssize_t run;
    OutBuf out;
    Tables t;
    PyObject *interfaces;
} Call;

static int
call_open(FastPathObject *self, PyObject *const *args, Py_ssize_t nargs, Call *c)
{
    memset(c, 0, sizeof *c);
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "takes (buf, pos, out)");
        return -1;
    }
    if (self->python == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FastPath was not initialised");
        return -1;
    }
    c->pos = PyLong_AsSsize_t(args[1]);
    if (c->pos == -1 && PyErr_Occurred())
        return -1;
    if (c->pos < 0) {
        PyErr_SetString(PyExc_ValueError, "pos must not be negative");
        return -1;
    }
    if (PyObject_GetBuffer(args[0], &c->view, PyBUF_SIMPLE))
        return -1;
    c->buf = c->view.buf;
    c->end = c->view.len;
    c->run = c->pos;
    if (tables_open(&c->t, self->objects, self->ids)) {
        PyBuffer_Release(&c->view);
        return -1;
    }
    PyObject *interfaces = PyObject_GetAttr(self->protocol, s_interfaces);
    if (interfaces == NULL || !PyDict_CheckExact(interfaces)) {
        if (interfaces != NULL)
            PyErr_SetString(PyExc_TypeError, "protocol.interfaces is not a dict");
        Py_XDECREF(interfaces);
        tables_close(&c->t);
        PyBuffer_Release(&c->view);
        return -1;
    }
    c->interfaces = interfaces;
    return 0;
}

static void
call_close(Call *c)
{
    PyMem_Free(c->out.data);
    Py_XDECREF(c->interfaces);
    tables_close(&c->t);
    PyBuffer_Release(&c->view);
}

/* The end of a call: what was handled goes out, and the offset reached back; or, for
   STEP_PYTHON, the rest of the buffer through the Python fast path. */
static PyObject *
call_finish(FastPathObject *self, Call *c, int status, PyObject *method, PyObject *buf,
            PyObject *out)
{
    PyObject *result = NULL;
    if (status == STEP_ERROR) {
        outbuf_flush(&c->out, out);
        call_close(c);
        return NULL;
    }
    if (c->run < c->pos) {
        if (c->out.len == 0) {
            if (outbox_add(out, c->buf + c->run, c->pos - c->run))
                goto done;
        } else if (outbuf_put(&c->out, c->buf + c->run, c->pos - c->run)) {
            outbuf_flush(&c->out, out);
            goto done;
        }
    }
    if (outbuf_flush(&c->out, out))
        goto done;
    if (status == STEP_PYTHON) {
        Py_ssize_t pos = c->pos;
        call_close(c);
        return hand_to_python(self, method, buf, pos, out);
    }
    result = PyLong_FromSsize_t(c->pos);
done:
    call_close(c);
    return result;
}

/* The version of a WaylandObject as a number, for ``spec.since > obj.version``. */
static int
version_of(PyObject *obj, long long *out)
{
    PyObject *v = SLOT(obj, off_obj_version);
    if (v == NULL || !PyLong_CheckExact(v))
        return STEP_PYTHON;
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return STEP_ERROR;
    return overflow ? STEP_PYTHON : STEP_OK;
}

/* A live WaylandObject in *alive (borrowed obj): STEP_OK, or STEP_PYTHON. */
static int
liveness(PyObject *obj, int *alive)
{
    if (!Py_IS_TYPE(obj, WaylandObject_T))
        return STEP_PYTHON;
    PyObject *a = SLOT(obj, off_obj_alive);
    if (a == NULL)
        return STEP_PYTHON;
    *alive = truth(a);
    return *alive < 0 ? STEP_ERROR : STEP_OK;
}

/* The upstream id of a client object argument: STEP_OK with *upstream, STEP_STOP when
   the compositor does not know it. */
static int
to_upstream(Tables *t, uint32_t value, uint32_t *upstream)
{
    if (value >= SERVER_ID_MIN) {
        *upstream = value;
        return STEP_OK;
    }
    int err = 0;
    PyObject *u = get_u32(t->to_upstream, value, &err);
    if (u == NULL)
        return err ? STEP_ERROR : STEP_STOP;
    int r = as_u32(u, upstream);
    return r < 0 ? STEP_ERROR : r ? STEP_PYTHON : STEP_OK;
}

/* One request at c->pos, size ``size``: STEP_OK once relayed (c->pos moved past it),
   STEP_STOP for the full path, STEP_PYTHON, STEP_ERROR. */
static int
one_request(FastPathObject *self, Call *c, uint32_t object_id, uint32_t word,
            Py_ssize_t size)
{
    Tables *t = &c->t;
    int err = 0, r;
    PyObject *obj = get_u32(t->entries, object_id, &err);
    if (obj == NULL)
        return err ? STEP_ERROR : STEP_STOP;
    int alive;
    if ((r = liveness(obj, &alive)) != STEP_OK)
        return r;
    if (!alive)
        return STEP_STOP;
    PyObject *interface = SLOT(obj, off_obj_interface);
    if (interface == NULL || !Py_IS_TYPE(interface, InterfaceSpec_T))
        return STEP_PYTHON;
    PyObject *messages = SLOT(interface, off_iface_requests);
    if (messages == NULL || !PyTuple_CheckExact(messages))
        return STEP_PYTHON;
    uint32_t opcode = word & 0xFFFF;
    if ((Py_ssize_t)opcode >= PyTuple_GET_SIZE(messages))
        return STEP_STOP;
    PyObject *spec = PyTuple_GET_ITEM(messages, opcode);
    PlanObject *plan;
    Py_INCREF(obj);
    r = plan_of(spec, py_request_plan, &plan);
    if (r != STEP_OK)
        goto out;
    long long version;
    if ((r = version_of(obj, &version)) != STEP_OK)
        goto out;
    r = STEP_STOP;
    if (plan->since > version || (plan->full_path && self->intercepting)
            || !plan_fits(plan, c->buf, c->pos, size))
        goto out;
    uint32_t target;
    if ((r = to_upstream(t, object_id, &target)) != STEP_OK)
        goto out;
    const unsigned char *body = c->buf + c->pos + HEADER_SIZE;
    uint32_t patch_index[MAX_PATCHES + 1], patch_value[MAX_PATCHES + 1];
    int npatch = 0;
    if (plan->nobjects > MAX_PATCHES) {
        r = STEP_PYTHON;
        goto out;
    }
    for (Py_ssize_t i = 0; i < plan->nobjects; i++) {
        ObjectArg *arg = &plan->objects[i];
        uint32_t value = rd32(body + 4 * (Py_ssize_t)arg->index);
        if (!value) {
            if (arg->nullable)
                continue;
            r = STEP_STOP;
            goto out;
        }
        PyObject *referred = get_u32(t->entries, value, &err);
        if (referred == NULL) {
            r = err ? STEP_ERROR : STEP_STOP;
            goto out;
        }
        int referred_alive;
        if ((r = liveness(referred, &referred_alive)) != STEP_OK)
            goto out;
        if (!referred_alive) {
            r = STEP_STOP;
            goto out;
        }
        if (arg->interface != NULL) {
            PyObject *ri = SLOT(referred, off_obj_interface);
            if (ri == NULL || !Py_IS_TYPE(ri, InterfaceSpec_T)) {
                r = STEP_PYTHON;
                goto out;
            }
            PyObject *name = SLOT(ri, off_iface_name);
            if (name == NULL || !PyUnicode_CheckExact(name)) {
                r = STEP_PYTHON;
                goto out;
            }
            if (name != arg->interface) {
                int eq = PyUnicode_Compare(name, arg->interface);
                if (eq == -1 && PyErr_Occurred()) {
                    r = STEP_ERROR;
                    goto out;
                }
                if (eq != 0) {
                    r = STEP_STOP;
                    goto out;
                }
            }
        }
        uint32_t upstream;
        if ((r = to_upstream(t, value, &upstream)) != STEP_OK)
            goto out;
        if (upstream != value) {
            patch_index[npatch] = arg->index;
            patch_value[npatch++] = upstream;
        }
    }
    if (plan->new_id >= 0) {
        uint32_t new_id = rd32(body + 4 * (Py_ssize_t)plan->new_id);
        PyObject *created = PyDict_GetItemWithError(c->interfaces, plan->new_interface);
        if (created == NULL) {
            r = PyErr_Occurred() ? STEP_ERROR : STEP_STOP;
            goto out;
        }
        /* ObjectMap.accepts_client_id, and no upstream id yet */
        r = STEP_STOP;
        if (!(1 <= new_id && new_id < MAP_MAX_OBJECTS))
            goto out;
        PyObject *new_key = PyLong_FromUnsignedLong(new_id);
        if (new_key == NULL) {
            r = STEP_ERROR;
            goto out;
        }
        long long next;
        int refuse, known = PyDict_Contains(t->entries, new_key);
        if (!known) {
            PyObject *refuse_obj = dict_attr(t->od, s_refuse);
            refuse = refuse_obj == NULL ? -1 : truth(refuse_obj);
            if (refuse < 0 || dict_attr_ll(t->od, s_client_next, &next))
                known = -1;
            else if (refuse && new_id > next)
                known = 1;
            else
                known = PyDict_Contains(t->to_upstream, new_key);
        }
        if (known) {
            Py_DECREF(new_key);
            r = known < 0 ? STEP_ERROR : STEP_STOP;
            goto out;
        }
        /* Every check passed: from here on the message is relayed.
           ObjectMap.create_by_client: */
        if ((long long)new_id + 1 > next
                && set_dict_attr_ll(t->od, s_client_next, (long long)new_id + 1)) {
            Py_DECREF(new_key);
            r = STEP_ERROR;
            goto out;
        }
        PyObject *made = new_wayland_object(new_key, created, SLOT(obj, off_obj_version));
        if (made == NULL || PyDict_SetItem(t->entries, new_key, made)) {
            Py_XDECREF(made);
            Py_DECREF(new_key);
            r = STEP_ERROR;
            goto out;
        }
        Py_DECREF(made);
        /* UpstreamIds.add_client_object: */
        PyObject *upstream_obj = ids_add_new_client_object(t, new_key, new_id);
        Py_DECREF(new_key);
        if (upstream_obj == NULL) {
            r = STEP_ERROR;
            goto out;
        }
        uint32_t upstream;
        r = as_u32(upstream_obj, &upstream);
        Py_DECREF(upstream_obj);
        if (r) {
            if (r > 0)
                PyErr_SetString(PyExc_ValueError, "an upstream id out of range");
            r = STEP_ERROR;
            goto out;
        }
        if (upstream != new_id) {
            patch_index[npatch] = (uint32_t)plan->new_id;
            patch_value[npatch++] = upstream;
        }
    }
    if (plan->destructor) {
        PyObject *target_obj = PyLong_FromUnsignedLong(target);
        if (target_obj == NULL || objects_destroyed(t, obj, 0) || ids_destroyed(t, target_obj)) {
            Py_XDECREF(target_obj);
            r = STEP_ERROR;
            goto out;
        }
        Py_DECREF(target_obj);
    }
    if (target != object_id || npatch) {
        if (emit_rewritten(&c->out, c->buf, c->run, c->pos, size, target, patch_index,
                           patch_value, npatch)) {
            r = STEP_ERROR;
            goto out;
        }
        c->run = c->pos + size;
    }
    c->pos += size;
    r = STEP_OK;
out:
    Py_DECREF(obj);
    return r;
}

static int
one_event(FastPathObject *self, Call *c, uint32_t upstream_id, uint32_t word, Py_ssize_t size)
{
    Tables *t = &c->t;
    int err = 0, r;
    uint32_t client_id;
    PyObject *obj;
    if (upstream_id >= SERVER_ID_MIN) {
        client_id = upstream_id;
        obj = get_u32(t->entries, client_id, &err);
    } else {
        PyObject *slot = get_u32(t->slots, upstream_id, &err);
        if (slot == NULL)
            return err ? STEP_ERROR : STEP_STOP;
        if (!Py_IS_TYPE(slot, Slot_T))
            return STEP_PYTHON;
        PyObject *cid = SLOT(slot, off_slot_client_id);
        if (cid == NULL)
            return STEP_PYTHON;
        if (cid == Py_None)
            return STEP_STOP; /* one of the proxy's own objects */
        r = as_u32(cid, &client_id);
        if (r)
            return r < 0 ? STEP_ERROR : STEP_PYTHON;
        /* the slot's own int as the key: an exact int, equal to client_id */
        obj = PyDict_GetItemWithError(t->entries, cid);
        if (obj == NULL && PyErr_Occurred())
            err = 1;
    }
    if (obj == NULL)
        return err ? STEP_ERROR : STEP_STOP;
    if (!Py_IS_TYPE(obj, WaylandObject_T))
        return STEP_PYTHON;
    PyObject *interface = SLOT(obj, off_obj_interface);
    if (interface == NULL || !Py_IS_TYPE(interface, InterfaceSpec_T))
        return STEP_PYTHON;
    PyObject *messages = SLOT(interface, off_iface_events);
    if (messages == NULL || !PyTuple_CheckExact(messages))
        return STEP_PYTHON;
    uint32_t opcode = word & 0xFFFF;
    if ((Py_ssize_t)opcode >= PyTuple_GET_SIZE(messages))
        return STEP_STOP;
    PyObject *spec = PyTuple_GET_ITEM(messages, opcode);
    PlanObject *plan;
    Py_INCREF(obj);
    r = plan_of(spec, py_event_plan, &plan);
    if (r != STEP_OK)
        goto out;
    r = STEP_STOP;
    if (plan->full_path || !plan_fits(plan, c->buf, c->pos, size))
        goto out;
    if (plan->nobjects > MAX_PATCHES) {
        r = STEP_PYTHON;
        goto out;
    }
    const unsigned char *body = c->buf + c->pos + HEADER_SIZE;
    uint32_t patch_index[MAX_PATCHES + 1], patch_value[MAX_PATCHES + 1];
    int npatch = 0;
    if (spec == self->delete_id_spec) {
        if (client_id != DISPLAY_ID)
            goto out;
        uint32_t deleted = rd32(body);
        if (deleted == DISPLAY_ID || deleted >= SERVER_ID_MIN)
            goto out;
        PyObject *deleted_obj = PyLong_FromUnsignedLong(deleted);
        if (deleted_obj == NULL) {
            r = STEP_ERROR;
            goto out;
        }
        PyObject *gone = PyDict_GetItemWithError(t->slots, deleted_obj);
        PyObject *gone_client = gone == NULL || !Py_IS_TYPE(gone, Slot_T) ? NULL
                                : SLOT(gone, off_slot_client_id);
        uint32_t gone_id = 0;
        if (gone == NULL)
            r = PyErr_Occurred() ? STEP_ERROR : STEP_STOP;
        else if (gone_client == NULL)
            r = STEP_PYTHON;
        else if (gone_client == Py_None)
            r = STEP_STOP;
        else {
            int ar = as_u32(gone_client, &gone_id);
            r = ar < 0 ? STEP_ERROR : ar ? STEP_PYTHON : STEP_OK;
        }
        if (r != STEP_OK) {
            Py_DECREF(deleted_obj);
            goto out;
        }
        Py_INCREF(gone);
        Py_INCREF(gone_client);
        int done = ids_delete_slot(t, deleted_obj, deleted, gone);
        Py_DECREF(deleted_obj);
        if (done == 0)
            done = objects_delete_id(t, gone_client);
        Py_DECREF(gone);
        Py_DECREF(gone_client);
        if (done < 0) {
            r = STEP_ERROR;
            goto out;
        }
        if (gone_id != deleted) {
            patch_index[npatch] = 0;
            patch_value[npatch++] = gone_id;
        }
    } else {
        for (Py_ssize_t i = 0; i < plan->nobjects; i++)
            if (!rd32(body + 4 * (Py_ssize_t)plan->objects[i].index)
                    && !plan->objects[i].nullable)
                goto out;
        PyObject *created = NULL;
        uint32_t new_id = 0;
        if (plan->new_id >= 0) {
            new_id = rd32(body + 4 * (Py_ssize_t)plan->new_id);
            created = PyDict_GetItemWithError(c->interfaces, plan->new_interface);
            if (created == NULL && PyErr_Occurred()) {
                r = STEP_ERROR;
                goto out;
            }
            PyObject *known = get_u32(t->entries, new_id, &err);
            if (err) {
                r = STEP_ERROR;
                goto out;
            }
            int known_alive = 0;
            if (known != NULL) {
                int lr = liveness(known, &known_alive);
                if (lr != STEP_OK) {
                    r = lr;
                    goto out;
                }
            }
            if (created == NULL || new_id < SERVER_ID_MIN || known_alive)
                goto out;
        }
        int identical = ids_identical(t);
        if (identical < 0) {
            r = STEP_ERROR;
            goto out;
        }
        if (!identical) {
            for (Py_ssize_t i = 0; i < plan->nobjects; i++) {
                uint32_t index = plan->objects[i].index;
                uint32_t value = rd32(body + 4 * (Py_ssize_t)index);
                if (!value || value >= SERVER_ID_MIN)
                    continue;
                PyObject *owner = get_u32(t->slots, value, &err);
                if (owner == NULL) {
                    r = err ? STEP_ERROR : STEP_STOP;
                    goto out;
                }
                if (!Py_IS_TYPE(owner, Slot_T)) {
                    r = STEP_PYTHON;
                    goto out;
                }
                PyObject *oc = SLOT(owner, off_slot_client_id);
                if (oc == NULL) {
                    r = STEP_PYTHON;
                    goto out;
                }
                if (oc == Py_None)
                    goto out; /* an object the client does not know: an error */
                uint32_t owner_id;
                int ar = as_u32(oc, &owner_id);
                if (ar) {
                    r = ar < 0 ? STEP_ERROR : STEP_PYTHON;
                    goto out;
                }
                if (owner_id != value) {
                    patch_index[npatch] = index;
                    patch_value[npatch++] = owner_id;
                }
            }
        }
        /* Every check passed: from here on the event is relayed. */
        if (plan->new_id >= 0) {
            PyObject *key = PyLong_FromUnsignedLong(new_id);
            if (key == NULL) {
                r = STEP_ERROR;
                goto out;
            }
            Py_INCREF(created);
            PyObject *made = objects_create_by_server(t, key, created,
                                                      SLOT(obj, off_obj_version));
            Py_DECREF(created);
            Py_DECREF(key);
            if (made == NULL) {
                r = STEP_ERROR;
                goto out;
            }
            Py_DECREF(made);
        }
        if (plan->destructor && objects_destroyed(t, obj, 1)) {
            r = STEP_ERROR;
            goto out;
        }
    }
    if (npatch || client_id != upstream_id) {
        if (emit_rewritten(&c->out, c->buf, c->run, c->pos, size, client_id, patch_index,
                           patch_value, npatch)) {
            r = STEP_ERROR;
            goto out;
        }
        c->run = c->pos + size;
    }
    c->pos += size;
    r = STEP_OK;
out:
    Py_DECREF(obj);
    return r;
}

typedef int (*StepFn)(FastPathObject *, Call *, uint32_t, uint32_t, Py_ssize_t);

static PyObject *
relay(FastPathObject *self, PyObject *const *args, Py_ssize_t nargs, StepFn step,
      PyObject *method)
{
    Call c;
    if (call_open(self, args, nargs, &c))
        return NULL;
    int status = STEP_STOP;
    while (c.end - c.pos >= HEADER_SIZE) {
        uint32_t id = rd32(c.buf + c.pos);
        uint32_t word = rd32(c.buf + c.pos + 4);
        Py_ssize_t size = (Py_ssize_t)(word >> 16);
        if (size > c.end - c.pos || size < HEADER_SIZE || size & 3
                || size > self->max_message_size)
            break;
        status = step(self, &c, id, word, size);
        if (status != STEP_OK)
            break;
    }
    if (status == STEP_OK)
        status = STEP_STOP;
    return call_finish(self, &c, status, method, args[0], args[2]);
}

static PyObject *
fastpath_requests(FastPathObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return relay(self, args, nargs, one_request, s_requests);
}

static PyObject *
fastpath_events(FastPathObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    return relay(self, args, nargs, one_event, s_events);
}

static PyMethodDef fastpath_methods[] = {
    {"requests", (PyCFunction)(void (*)(void))fastpath_requests, METH_FASTCALL,
     "requests(buf, pos, up) -> int: relay requests from buf[pos:] into up until one "
     "needs the full path (or is incomplete); the offset of the first not handled."},
    {"events", (PyCFunction)(void (*)(void))fastpath_events, METH_FASTCALL,
     "events(buf, pos, down) -> int: relay events from buf[pos:] into down until one "
     "needs the full path (or is incomplete); the offset of the first not handled."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef fastpath_members[] = {
    {"protocol", T_OBJECT, offsetof(FastPathObject, protocol), READONLY, NULL},
    {"objects", T_OBJECT, offsetof(FastPathObject, objects), READONLY, NULL},
    {"ids", T_OBJECT, offsetof(FastPathObject, ids), READONLY, NULL},
    {"intercepting", T_BOOL, offsetof(FastPathObject, intercepting), READONLY, NULL},
    {"max_message_size", T_PYSSIZET, offsetof(FastPathObject, max_message_size), READONLY,
     NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastPath_T = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "qubesshm.relay._fastpath.FastPath",
    .tp_basicsize = sizeof(FastPathObject),
    .tp_dealloc = (destructor)fastpath_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The relay's fast path, compiled: FastPath(protocol, objects, ids, *, "
              "intercepting, max_message_size), as qubesshm.relay.fastpath.FastPath.",
    .tp_traverse = (traverseproc)fastpath_traverse,
    .tp_clear = (inquiry)fastpath_clear,
    .tp_methods = fastpath_methods,
    .tp_members = fastpath_members,
    .tp_init = (initproc)fastpath_init,
    .tp_new = PyType_GenericNew,
};

/* -- the table operations, for the tests that hold them to the Python methods -------- */

static int
check_args(const char *name, Py_ssize_t nargs, Py_ssize_t wanted)
{
    if (nargs == wanted)
        return 1;
    PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, wanted,
                 nargs);
    return 0;
}

/* The tables of a module function's first argument, an ObjectMap (ON_OBJECTS) or an
   UpstreamIds (ON_IDS), once its argument count is checked; -1 with an exception set.
   The caller closes them. */
enum { ON_OBJECTS, ON_IDS };

static int
entry_open(Tables *t, const char *name, PyObject *const *args, Py_ssize_t nargs,
           Py_ssize_t wanted, int on)
{
    if (!check_args(name, nargs, wanted) || set_up())
        return -1;
    return tables_open(t, on == ON_OBJECTS ? args[0] : NULL, on == ON_IDS ? args[0] : NULL);
}

static PyObject *
mod_add_client_object(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (entry_open(&t, "add_client_object", args, nargs, 2, ON_IDS))
        return NULL;
    PyObject *res = ids_add_client_object(&t, args[1]);
    tables_close(&t);
    return res;
}

static PyObject *
mod_delete_id(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (entry_open(&t, "delete_id", args, nargs, 2, ON_IDS))
        return NULL;
    PyObject *res = ids_delete_id(&t, args[1]);
    tables_close(&t);
    return res;
}

static PyObject *
mod_destroyed(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (entry_open(&t, "destroyed", args, nargs, 2, ON_IDS))
        return NULL;
    int r = ids_destroyed(&t, args[1]);
    tables_close(&t);
    if (r)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
mod_create_by_client(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (entry_open(&t, "create_by_client", args, nargs, 4, ON_OBJECTS))
        return NULL;
    PyObject *res = objects_create_by_client(&t, args[1], args[2], args[3]);
    tables_close(&t);
    return res;
}

static PyObject *
mod_create_by_server(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (entry_open(&t, "create_by_server", args, nargs, 4, ON_OBJECTS))
        return NULL;
    PyObject *res = objects_create_by_server(&t, args[1], args[2], args[3]);
    tables_close(&t);
    return res;
}

static PyObject *
mod_object_destroyed(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (!check_args("object_destroyed", nargs, 3) || set_up())
        return NULL;
    if (!Py_IS_TYPE(args[1], WaylandObject_T)) {
        PyErr_SetString(PyExc_TypeError, "object_destroyed needs a WaylandObject");
        return NULL;
    }
    int by_compositor = PyObject_IsTrue(args[2]);
    if (by_compositor < 0 || tables_open(&t, args[0], NULL))
        return NULL;
    int r = objects_destroyed(&t, args[1], by_compositor);
    tables_close(&t);
    if (r)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
mod_object_delete_id(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    Tables t;
    if (entry_open(&t, "object_delete_id", args, nargs, 2, ON_OBJECTS))
        return NULL;
    int r = objects_delete_id(&t, args[1]);
    tables_close(&t);
    if (r < 0)
        return NULL;
    return PyBool_FromLong(r);
}

static PyMethodDef module_methods[] = {
    {"add_client_object", (PyCFunction)(void (*)(void))mod_add_client_object, METH_FASTCALL,
     "UpstreamIds.add_client_object(ids, client_id), as the compiled core does it."},
    {"delete_id", (PyCFunction)(void (*)(void))mod_delete_id, METH_FASTCALL,
     "UpstreamIds.delete_id(ids, upstream_id), as the compiled core does it."},
    {"destroyed", (PyCFunction)(void (*)(void))mod_destroyed, METH_FASTCALL,
     "UpstreamIds.destroyed(ids, upstream_id), as the compiled core does it."},
    {"create_by_client", (PyCFunction)(void (*)(void))mod_create_by_client, METH_FASTCALL,
     "ObjectMap.create_by_client(objects, id, interface, version), compiled."},
    {"create_by_server", (PyCFunction)(void (*)(void))mod_create_by_server, METH_FASTCALL,
     "ObjectMap.create_by_server(objects, id, interface, version), compiled."},
    {"object_destroyed", (PyCFunction)(void (*)(void))mod_object_destroyed, METH_FASTCALL,
     "ObjectMap.destroyed(objects, obj, by_compositor), compiled."},
    {"object_delete_id", (PyCFunction)(void (*)(void))mod_object_delete_id, METH_FASTCALL,
     "ObjectMap.delete_id(objects, id), compiled."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "qubesshm.relay._fastpath",
    .m_doc = "The relay's fast path, compiled (see qubesshm/relay/fastpath.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if (PyType_Ready(&Plan_T) < 0 || PyType_Ready(&FastPath_T) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPath_T) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
