/*
 * core/list.h - the project's intrusive lists: <sys/queue.h>, plus the
 * _SAFE iterators glibc's copy lacks (a loop that may remove the element
 * it stands on).
 */
#ifndef MP_CORE_LIST_H
#define MP_CORE_LIST_H

#include <sys/queue.h>

#ifndef TAILQ_FOREACH_SAFE
#define TAILQ_FOREACH_SAFE(var, head, field, tvar) \
    for ((var) = TAILQ_FIRST(head); (var) && ((tvar) = TAILQ_NEXT(var, field), 1); (var) = (tvar))
#endif

#ifndef LIST_FOREACH_SAFE
#define LIST_FOREACH_SAFE(var, head, field, tvar) \
    for ((var) = LIST_FIRST(head); (var) && ((tvar) = LIST_NEXT(var, field), 1); (var) = (tvar))
#endif

#endif
