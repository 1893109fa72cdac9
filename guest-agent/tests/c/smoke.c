/* Exercises libsnowflock through snowflock.h; driven by tests/agent_loop.rs. */
#include <stdio.h>
#include "snowflock.h"

int main(void) {
    if (sf_clone(NULL) != -1) return 10;
    printf("null: %s\n", sf_last_error());
    printf("id: %d\n", sf_id());
    sf_ticket_t t;
    int g = sf_request_ticket(2, &t);
    if (g < 0) { printf("ticket error: %s\n", sf_last_error()); return 1; }
    printf("ticket: %s granted %d\n", t.id, t.granted);
    printf("clone: %d\n", sf_clone(&t));
    sf_child_t kids[1];
    int n = sf_status(&t, kids, 1);
    printf("status: %d first %d/%d\n", n, kids[0].clone_id, kids[0].state);
    n = sf_join(&t, kids, 1);
    printf("join: %d first %d/%d/%d\n", n, kids[0].clone_id, kids[0].state, kids[0].code);
    if (sf_kill(&t) != -1) return 11;
    printf("kill: %s\n", sf_last_error());
    sf_exit(0);
    printf("exit: %s\n", sf_last_error());
    return 0;
}
