/* Exercises libsnowflock's C API inside a guest: ticket, clone, exit, join. */
#include <stdio.h>
#include <string.h>
#include "snowflock.h"

int main(void) {
    sf_ticket_t t;
    int granted = sf_request_ticket(2, &t);
    if (granted < 1) { fprintf(stderr, "ticket: %s\n", sf_last_error()); return 1; }
    int id = sf_clone(&t);
    if (id < 0) { fprintf(stderr, "clone: %s\n", sf_last_error()); return 1; }
    if (id > 0) {
        sf_exit(40 + id);
        return 99; /* not reached */
    }
    sf_child_t kids[8];
    int n = sf_join(&t, kids, 8);
    if (n < 0) { fprintf(stderr, "join: %s\n", sf_last_error()); return 1; }
    printf("granted=%d children=%d\n", granted, n);
    for (int i = 0; i < n; i++)
        printf("child %d state %d code %d\n", kids[i].clone_id, kids[i].state, kids[i].code);
    sf_ticket_t bogus;
    memset(&bogus, 0, sizeof bogus);
    strcpy(bogus.id, "t-00");
    if (sf_clone(&bogus) != -1) { fprintf(stderr, "bogus ticket accepted\n"); return 1; }
    printf("bogus: %s\n", sf_last_error());
    if (sf_clone(NULL) != -1) return 1;
    return 0;
}
