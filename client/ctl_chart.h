/* Terminal charts of ZENITH's learning rate and gradient norms, for `zenithctl watch`: eta_t in
 * one chart and n_t, m_t, M_t in a second below it, sharing the step axis, drawn with Unicode
 * braille (2 x 4 dots a character) and ANSI colours. */
#ifndef ZN_CTL_CHART_H
#define ZN_CTL_CHART_H

#include <stdint.h>
#include <stdio.h>

#include "zenith.pb-c.h"

typedef struct ctl_chart ctl_chart;

ctl_chart* ctl_chart_new(void);
void ctl_chart_free(ctl_chart* c);

/* Takes one step's eta_t, n_t, m_t and M_t. A step reported again (a job that restarted)
 * replaces itself and every later one. Memory stays bounded: past a few thousand points the
 * chart keeps every other one. */
void ctl_chart_add(ctl_chart* c, const Zenith__V1__StepMetrics* m);

/* Lines ctl_chart_draw writes for charts `rows` rows high. */
int ctl_chart_lines(int rows);

/* Writes both charts, each `rows` text rows high, over steps 1 to the larger of last_step and the
 * last step added: every line ends in "\n" and is at most width - 1 columns wide, so that a
 * terminal `width` columns wide never wraps it. color: use ANSI colours. Writes nothing when
 * width is under 30 columns or no step has been added. Returns the lines written. */
int ctl_chart_draw(const ctl_chart* c, FILE* out, int width, int rows, int64_t last_step,
                   int color);

#endif
