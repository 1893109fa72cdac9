/*
 * snowflock.h - the SnowFlock VM fork API for C programs in a guest.
 *
 * Link with -lsnowflock. Every call talks to snowflock-agent over
 * /run/snowflock/agent.sock (or $SNOWFLOCK_AGENT_SOCKET). Calls are
 * thread-safe; on failure they return -1 and sf_last_error() returns a
 * message for the calling thread.
 *
 *   sf_ticket_t t;
 *   if (sf_request_ticket(4, &t) < 0) { fprintf(stderr, "%s\n", sf_last_error()); exit(1); }
 *   int id = sf_clone(&t);            // 0 in the parent, 1..t.granted in clones
 *   if (id > 0) { work(id); sf_exit(0); }
 *   sf_child_t kids[64];
 *   int n = sf_join(&t, kids, 64);
 */
#ifndef SNOWFLOCK_H
#define SNOWFLOCK_H

#ifdef __cplusplus
extern "C" {
#endif

#define SF_TICKET_MAX 80

/* An allocation ticket: id is a NUL-terminated "t-<hex>" string. */
typedef struct {
    char id[SF_TICKET_MAX];
    int granted; /* clones granted (<= requested) */
} sf_ticket_t;

#define SF_CHILD_RUNNING 0
#define SF_CHILD_EXITED 1
#define SF_CHILD_KILLED 2
#define SF_CHILD_LOST 3

typedef struct {
    int clone_id;
    int state; /* 0 running, 1 exited, 2 killed, 3 lost */
    int code;  /* sf_exit status when state is 1, else 0 */
} sf_child_t;

/* Asks for n clones. Returns the granted count (>= 0), -1 on error. */
int sf_request_ticket(int n, sf_ticket_t *out);

/* sf_request_ticket_ex's independent: the host's default, no, yes. */
#define SF_INDEPENDENT_DEFAULT (-1)
#define SF_INDEPENDENT_NO 0
#define SF_INDEPENDENT_YES 1

/* sf_request_ticket with independence: with SF_INDEPENDENT_YES the clones'
 * hosts fetch the whole memory (and disk) of the clone point in the
 * background, so the clones stop depending on this VM's host once it is
 * there; with SF_INDEPENDENT_NO they fetch only what the clones read.
 * sf_request_ticket(n, out) is sf_request_ticket_ex(n, SF_INDEPENDENT_DEFAULT,
 * out). Returns the granted count (>= 0), -1 on error. */
int sf_request_ticket_ex(int n, int independent, sf_ticket_t *out);

/* Clones this VM (runs malloc_trim(0) first). Returns 0 in the parent, the
 * clone ID (1..granted) in each clone, -1 on error. */
int sf_clone(const sf_ticket_t *t);

/* Ends this clone with status; does not return on success (the VM is
 * destroyed). Returns only on error, e.g. in the parent, with
 * sf_last_error() set. */
void sf_exit(int status);

/* Waits until every child of t has ended; fills at most max entries of out
 * and returns the number of children (may exceed max), -1 on error. out may
 * be NULL when max is 0. The ticket is discarded. */
int sf_join(const sf_ticket_t *t, sf_child_t *out, int max);

/* The children of t now, without waiting: fills at most max entries of out
 * and returns the number of children, -1 on error. The ticket is kept. */
int sf_status(const sf_ticket_t *t, sf_child_t *out, int max);

/* Ends every child of t now. Returns the number of children it killed, -1 on
 * error. The ticket is discarded. */
int sf_kill(const sf_ticket_t *t);

/* This VM's clone ID (0 in the parent), -1 on error. */
int sf_id(void);

/* Message of the calling thread's last error ("" if none); valid until the
 * next failing call on this thread. */
const char *sf_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SNOWFLOCK_H */
