// The GradGuard tab: "where does my gradient die, and since when?", drawn from the logged data.
//
// One ES module of plain JavaScript, loaded by TensorBoard into the tab's iframe (no build step,
// nothing fetched from outside: it works offline). TensorBoard calls render(); the data comes from
// the plugin's JSON routes (lightning_gradguard/tensorboard/plugin.py), relative to the iframe's base URL.
//
// Views: the report's verdict; the gradient-flow heatmap (layers x logging steps, log10 norm,
// non-finite steps marked, skipped steps in their own colour, the thresholds in the legend) with the
// events on the same time axis, and the same for the update-to-weight ratios (track_updates);
// one per-timestep heatmap per tracked sequence (timesteps x logging steps, with the horizon
// line); the events table, whose rows jump to their step (with the ranks an event names: a replica
// divergence's odd ranks, a replay's suspects). Every cell shows its value on hover.

const SVG = 'http://www.w3.org/2000/svg';
const VIRIDIS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];
const NONFINITE = '#d62728';
const VANISHING = '#1a1a1a';
const EXPLODING = '#ff7f0e';
const ZERO = '#8c564b';  // an exactly-zero gradient (a dead layer's colour): a value, never "missing"
// A skipped step (non-finite, a spike, rolled back, an fp16 overflow): its update is zero because it was
// skipped, not because the layer is dead. A non-finite cell keeps its own colour: it shows where the fault was.
const SKIPPED = '#c5b0d5';
const MISSING = '#f5f5f5';  // the layer logged nothing at that step
const KIND_COLOURS = {
  nonfinite: NONFINITE, amp_overflow: '#9467bd', exploding: EXPLODING, spike: '#e377c2',
  vanishing: '#7f7f7f', dead: '#8c564b', unused: '#bcbd22', loss_scale_collapse: '#17becf',
  vanishing_in_time: '#1f77b4', exploding_in_time: '#ff9896', stopped: '#000000', rollback: '#2ca02c',
  spike_skipped: '#c5b0d5', replica_divergence: '#8b0000',
};

const STYLE = `
  body { font-family: Roboto, Arial, sans-serif; font-size: 13px; color: #212121; margin: 0; }
  #gg { padding: 12px 20px 40px; }
  #gg header { display: flex; align-items: baseline; gap: 18px; }
  #gg h1 { font-size: 20px; font-weight: 500; margin: 4px 0 8px; }
  #gg h2 { font-size: 15px; font-weight: 500; margin: 22px 0 6px; }
  #gg h3 { font-size: 13px; font-weight: 500; margin: 12px 0 4px; }
  .gg-verdict { border-left: 6px solid #2ca02c; background: #f1f8e9; padding: 8px 12px; }
  .gg-verdict.unhealthy { border-color: ${NONFINITE}; background: #fdecea; }
  .gg-verdict.attention { border-color: #ef6c00; background: #fff3e0; }
  .gg-verdict ul { margin: 4px 0 0; padding-left: 18px; }
  .gg-note { color: #616161; margin: 2px 0 6px; }
  .gg-legend { display: flex; flex-wrap: wrap; align-items: center; gap: 14px; margin: 4px 0; }
  .gg-swatch { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin-right: 4px; }
  .gg-tip { position: fixed; pointer-events: none; background: rgba(33,33,33,.92); color: #fff;
            padding: 4px 8px; border-radius: 3px; font-size: 12px; display: none; z-index: 10; }
  table.gg-events { border-collapse: collapse; width: 100%; }
  table.gg-events th, table.gg-events td { text-align: left; padding: 3px 8px; border-bottom: 1px solid #eee;
                                           vertical-align: top; }
  tr.gg-event { cursor: pointer; }
  tr.gg-event:hover, tr.gg-event.selected { background: #fff3e0; }
  .gg-kind { font-weight: 500; white-space: nowrap; }
  svg text { font-size: 11px; fill: #424242; }
`;

/** TensorBoard's entry point. */
export async function render() {
  const style = document.createElement('style');
  style.textContent = STYLE;
  document.head.appendChild(style);
  const root = el('div', {id: 'gg'});
  const select = el('select', {id: 'gg-run'});
  const header = el('header', {}, [el('h1', {}, ['GradGuard']), el('label', {}, ['Run ', select])]);
  const body = el('div', {id: 'gg-body'});
  const tip = el('div', {class: 'gg-tip', id: 'gg-tip'});
  root.append(header, body, tip);
  document.body.appendChild(root);
  const runs = (await getJSON('./runs')) || [];
  if (!runs.length) {
    body.textContent = 'No run in this logdir holds GradGuard data.';
    document.body.dataset.ggReady = '1';
    return;
  }
  for (const run of runs) select.appendChild(el('option', {value: run}, [run]));
  const wanted = new URLSearchParams(location.search).get('run');
  select.value = runs.includes(wanted) ? wanted : runs[0];
  select.onchange = () => show(select.value, body, tip);
  await show(select.value, body, tip);
}

async function show(run, body, tip) {
  document.body.dataset.ggReady = '0';
  body.textContent = 'Loading…';
  const q = `?run=${encodeURIComponent(run)}`;
  const [report, layers, timesteps, events, updates] = await Promise.all(
      ['report', 'layers', 'timesteps', 'events', 'updates'].map((route) => getJSON(`./${route}${q}`)));
  body.textContent = '';
  body.dataset.run = run;
  body.appendChild(verdictView(report));
  const flow = flowView(layers || {layers: [], steps: []}, events || [], tip);
  body.appendChild(flow.node);
  if (updates && updates.layers && updates.layers.length) {  // track_updates: beside the gradient flow
    body.appendChild(flowView(updates, events || [], tip, {
      id: 'gg-updates', title: 'Update-to-weight ratio: layers × steps (log10 ‖ΔW‖/‖W‖ of the update before each step)',
      quantity: '‖ΔW‖/‖W‖', zero: 'zero update', updates: true,
    }).node);
  }
  body.appendChild(timestepView(timesteps || {sequences: {}}, tip));
  body.appendChild(eventsView(events || [], flow.jumpTo));
  document.body.dataset.ggReady = '1';
}

// ---------------------------------------------------------------- views
function verdictView(report) {
  // healthy and "healthy with notes" are green, attention amber, unhealthy red
  const severity = report && report.severity;
  const tone = report && report.healthy ? 'healthy' : severity === 'attention' ? 'attention' : 'unhealthy';
  const box = el('section', {class: `gg-verdict ${tone}`, id: 'gg-verdict', 'data-severity': severity || ''});
  box.appendChild(el('strong', {}, [report ? report.verdict : 'no report']));
  if (report && report.findings && report.findings.length) {
    const list = el('ul');
    for (const f of report.findings) list.appendChild(el('li', {'data-kind': f.kind}, [`${f.kind}: ${f.advice}`]));
    box.appendChild(list);
  }
  return box;
}

function flowView(data, events, tip, opts = {}) {
  const id = opts.id || 'gg-flow';
  const section = el('section', {id});
  section.appendChild(el('h2', {}, [opts.title || 'Gradient flow: layers × steps (log10 ‖∂L/∂W‖)']));
  const {layers, steps} = data;
  if (!layers.length) {
    section.appendChild(el('p', {class: 'gg-note'}, ['No per-layer norms were logged.']));
    return {node: section, jumpTo: () => {}};
  }
  const groups = data.groups || [];
  if (groups.length || data.lo) {
    section.appendChild(el('p', {class: 'gg-note'}, [
      (groups.length ? `${layers.length} layers in ${groups.length} groups (each shows its worst value; click a ` +
                       'group to expand it). ' : '') +
      (data.lo ? `${steps.length} columns of binned steps: each shows its bin's worst value; hover for min, ` +
                 'median and max.' : '')]));
  }
  // ?expand=<group>[,<group>] opens groups at load (a link to one block); a click toggles one.
  const wanted = (new URLSearchParams(location.search).get('expand') || '').split(',');
  const expanded = new Set(groups.map((g, k) => (wanted.includes(g.name) ? k : -1)).filter((k) => k >= 0));
  const holder = el('div', {id: `${id}-holder`});
  section.appendChild(holder);
  let jumpTo = () => {};
  const draw = () => {
    holder.textContent = '';
    const drawn = drawFlow(data, events, tip, groups, expanded, id, opts, (k) => {
      if (expanded.has(k)) expanded.delete(k); else expanded.add(k);
      draw();
    });
    holder.appendChild(drawn.svg);
    jumpTo = drawn.jumpTo;
  };
  draw();
  const scale = colourScale(data.log10);
  const vanish = data.vanish_threshold ? Math.log10(data.vanish_threshold) : null;
  const explode = data.explode_threshold ? Math.log10(data.explode_threshold) : null;
  section.appendChild(legend(scale, vanish, explode, data, opts));
  return {node: section, jumpTo: (step) => jumpTo(step)};
}

// The rows to draw: every layer, or (past a few dozen) the groups, each followed by its layers when expanded.
function flowRows(data, groups, expanded) {
  if (!groups.length) return data.layers.map((name, i) => ({kind: 'layer', name, i}));
  const rows = [];
  groups.forEach((g, k) => {
    rows.push({kind: 'group', name: g.name, k, size: g.members.length});
    if (expanded.has(k)) for (const i of g.members) rows.push({kind: 'layer', name: data.layers[i], i, member: true});
  });
  return rows;
}

function drawFlow(data, events, tip, groups, expanded, id, opts, toggle) {
  const {steps} = data;
  const skipped = data.skipped || [];  // per column: why its step(s) were skipped, or null
  const quantity = opts.quantity || '‖g‖';
  const rows = flowRows(data, groups, expanded);
  const vanish = data.vanish_threshold ? Math.log10(data.vanish_threshold) : null;
  const explode = data.explode_threshold ? Math.log10(data.explode_threshold) : null;
  const scale = colourScale(data.log10);
  const labelW = Math.min(240, 12 + 7 * Math.max(...rows.map((r) => r.name.length + (r.kind === 'group' ? 6 : 0))));
  const cellW = Math.max(2, Math.min(24, Math.floor(900 / Math.max(1, steps.length))));
  const cellH = 16;
  const top = 14;
  const stripH = 22;
  const width = labelW + cellW * steps.length + 10;
  const height = top + cellH * rows.length + stripH + 28;
  const svg = svgEl('svg', {width, height, id: `${id}-map`});
  const bad = new Set(data.nonfinite_steps);
  steps.forEach((s, j) => {
    if (bad.has(s)) {
      svg.appendChild(svgEl('path', {
        d: `M${labelW + j * cellW + cellW / 2 - 4},2 h8 l-4,8 z`, fill: NONFINITE,
        class: 'gg-nonfinite-mark', 'data-step': s}));
    }
  });
  const binned = (j) => data.bins && data.bins[j] && data.bins[j][0] !== data.bins[j][1];
  const span = (j) => (binned(j) ? `steps ${data.bins[j][0]}–${data.bins[j][1]}` : `step ${steps[j]}`);
  const skipNote = (j) => (binned(j) ? `every ${opts.updates ? 'update' : 'step'} skipped (${skipped[j]})`
    : opts.updates ? `the update of step ${steps[j] - 1} skipped (${skipped[j]})` : `step skipped (${skipped[j]})`);
  rows.forEach((r, n) => {
    const y = top + n * cellH;
    const group = r.kind === 'group';
    const row = svgEl('g', group
      ? {class: 'gg-group', 'data-group': r.name, 'data-size': r.size, 'data-expanded': expanded.has(r.k) ? '1' : '0'}
      : {class: 'gg-row', 'data-layer': r.name});
    const label = group ? `${expanded.has(r.k) ? '▾' : '▸'} ${r.name} (${r.size})` : r.name;
    const text = svgText(labelW - 6, y + cellH - 4, label, 'end');
    if (group) {
      row.setAttribute('style', 'cursor: pointer');
      text.setAttribute('style', 'font-weight: 500');
      row.addEventListener('click', () => toggle(r.k));
    }
    row.appendChild(text);
    const src = group ? groups[r.k] : {norms: data.norms[r.i], log10: data.log10[r.i]};
    src.log10.forEach((v, j) => {
      const raw = src.norms[j];
      let fill = v === null ? MISSING : scale(v);
      let cls = 'gg-cell';
      const nonfinite = raw === null && v === null && bad.has(steps[j]);
      if (skipped[j]) { fill = nonfinite ? NONFINITE : SKIPPED; cls = 'gg-cell gg-skipped'; }
      else if (raw === 0) { fill = ZERO; cls = 'gg-cell gg-zero'; }
      else if (nonfinite) fill = NONFINITE;
      else if (v !== null && vanish !== null && v < vanish) fill = VANISHING;
      else if (v !== null && explode !== null && v > explode) fill = EXPLODING;
      let value = raw === null ? (bad.has(steps[j]) ? 'non-finite' : 'no value') : fmt(raw);
      if (!group && data.lo && data.lo[r.i][j] !== null) {
        value += ` (min ${fmt(data.lo[r.i][j])}, median ${fmt(data.mid[r.i][j])}, max ${fmt(data.hi[r.i][j])})`;
      }
      const note = (group ? ' (the worst in the group)' : '') + (skipped[j] ? ` · ${skipNote(j)}` : '');
      row.appendChild(svgEl('rect', {
        x: labelW + j * cellW, y, width: cellW, height: cellH - 1, fill, class: cls,
        'data-tip': `${r.name} · ${span(j)} · ${quantity} = ${value}${note}`}));
    });
    svg.appendChild(row);
  });
  // The events on the same time axis, under the heatmap.
  const x = stepAxis(steps, labelW, cellW);
  const stripY = top + cellH * rows.length + 6;
  svg.appendChild(svgText(labelW - 6, stripY + 12, 'events', 'end'));
  for (const e of events) {
    svg.appendChild(svgEl('circle', {
      cx: x(e.step), cy: stripY + 8, r: 4, fill: KIND_COLOURS[e.kind] || '#555', class: 'gg-event-mark',
      'data-step': e.step,
      'data-tip': `step ${e.step} · ${e.kind}${e.origin ? ' · origin ' + e.origin : ''}` +
                  (e.batches ? ` · batches undone: ${e.batches}` : '')}));
  }
  const axisY = stripY + stripH + 10;
  for (const j of ticks(steps.length)) svg.appendChild(svgText(labelW + j * cellW + cellW / 2, axisY, steps[j], 'middle'));
  const marker = svgEl('rect', {x: 0, y: top - 2, width: cellW, height: cellH * rows.length + 4, fill: 'none',
                                stroke: '#000', 'stroke-width': 2, visibility: 'hidden', id: 'gg-step-marker'});
  svg.appendChild(marker);
  hover(svg, tip);
  const jumpTo = (step) => {
    const j = nearest(steps, step);
    marker.setAttribute('x', labelW + j * cellW);
    marker.setAttribute('visibility', 'visible');
    document.body.dataset.ggSelectedStep = String(step);
    svg.scrollIntoView({behavior: 'smooth', block: 'start'});
  };
  return {svg, jumpTo};
}

function timestepView(data, tip) {
  const section = el('section', {id: 'gg-timesteps'});
  section.appendChild(el('h2', {}, ['Gradient through time: timesteps × steps (log10 ‖∂L/∂x_t‖)']));
  const names = Object.keys(data.sequences);
  if (!names.length) {
    section.appendChild(el('p', {class: 'gg-note'}, ['No recurrent module or track_timesteps() sequence was tracked.']));
    return section;
  }
  section.appendChild(el('p', {class: 'gg-note'},
      ['Each row is one logging step; timestep 0 is the earliest. The line marks the horizon: how far back ' +
       'from the last timestep the gradient stays above 1% of its peak.']));
  for (const name of names) {
    const seq = data.sequences[name];
    const scale = colourScale(seq.log10);
    const cellW = Math.max(1, Math.min(14, Math.floor(900 / Math.max(1, seq.length))));
    const cellH = Math.max(3, Math.min(14, Math.floor(360 / Math.max(1, seq.steps.length))));
    const labelW = 70;
    const svg = svgEl('svg', {width: labelW + cellW * seq.length + 10, height: cellH * seq.steps.length + 30,
                              class: 'gg-timestep-map', 'data-sequence': name});
    let horizon = '';  // a path: a row without a finite profile breaks the line
    let pen = 'M';
    seq.steps.forEach((s, i) => {
      const y = i * cellH;
      const row = svgEl('g', {class: 'gg-trow', 'data-step': s});
      if (cellH >= 9 || i % Math.ceil(10 / cellH) === 0) row.appendChild(svgText(labelW - 6, y + cellH - 1, s, 'end'));
      seq.log10[i].forEach((v, t) => {
        row.appendChild(svgEl('rect', {
          x: labelW + t * cellW, y, width: cellW, height: cellH, fill: v === null ? '#f5f5f5' : scale(v),
          class: 'gg-cell', 'data-tip': `${name} · step ${s} · t = ${t} · log10 ‖g‖ = ${v === null ? '—' : v.toFixed(2)}`}));
      });
      svg.appendChild(row);
      const len = seq.log10[i].length;
      if (seq.horizon[i] > 0) {
        horizon += `${pen}${labelW + (len - seq.horizon[i]) * cellW},${y + cellH / 2} `;
        pen = 'L';
      } else {
        pen = 'M';
      }
    });
    svg.appendChild(svgEl('path', {d: horizon, fill: 'none', stroke: '#ffffff', 'stroke-width': 2, class: 'gg-horizon'}));
    const axisY = cellH * seq.steps.length + 14;
    for (const t of ticks(seq.length)) svg.appendChild(svgText(labelW + t * cellW + cellW / 2, axisY, t, 'middle'));
    hover(svg, tip);
    section.appendChild(el('h3', {}, [name]));
    section.appendChild(svg);
    section.appendChild(legend(scale, null, null, null));
  }
  return section;
}

function eventsView(events, jumpTo) {
  const section = el('section', {id: 'gg-events'});
  const replayed = events.length && events.every((e) => e.replayed);
  section.appendChild(el('h2', {}, [`Events (${events.length})`]));
  if (replayed) {
    section.appendChild(el('p', {class: 'gg-note gg-replayed'},
        ['An older event file that recorded no event: these are the guard\'s detectors replayed on its logged steps.']));
  }
  if (!events.length) {
    section.appendChild(el('p', {class: 'gg-note'}, ['No event was recorded.']));
    return section;
  }
  const table = el('table', {class: 'gg-events'});
  const heads = ['step', 'kind', 'ranks', 'origin', 'layers', 'message'];
  table.appendChild(el('tr', {}, heads.map((h) => el('th', {}, [h]))));
  for (const e of events) {
    const row = el('tr', {class: 'gg-event', 'data-step': e.step, 'data-kind': e.kind}, [
      el('td', {}, [String(e.step)]),
      el('td', {class: 'gg-kind', style: `color: ${KIND_COLOURS[e.kind] || '#555'}`}, [e.kind]),
      el('td', {class: 'gg-ranks'}, [(e.ranks || []).join(', ')]),  // a divergence's odd ranks, a replay's suspects
      el('td', {}, [e.origin || '']),
      el('td', {}, [(e.layers || []).join(', ')]),
      el('td', {}, [e.message || '',
                    ...(e.batches ? [el('div', {class: 'gg-batches'}, [`batches undone: ${e.batches}`])] : [])]),
    ]);
    row.onclick = () => {
      for (const r of table.querySelectorAll('tr.selected')) r.classList.remove('selected');
      row.classList.add('selected');
      jumpTo(e.step);
    };
    table.appendChild(row);
  }
  section.appendChild(table);
  return section;
}

function legend(scale, vanish, explode, data, opts = {}) {
  const box = el('div', {class: 'gg-legend'});
  const bar = svgEl('svg', {width: 180, height: 26, class: 'gg-colourbar'});
  for (let k = 0; k < 60; k++) {
    bar.appendChild(svgEl('rect', {x: k * 3, y: 0, width: 3, height: 10, fill: scale(scale.lo + (scale.hi - scale.lo) * k / 59)}));
  }
  bar.appendChild(svgText(0, 24, scale.lo.toFixed(1), 'start'));
  bar.appendChild(svgText(180, 24, scale.hi.toFixed(1), 'end'));
  box.append(el('span', {}, ['log10 norm ']), bar);
  if (data) {
    box.appendChild(swatch(NONFINITE, 'non-finite'));
    box.appendChild(swatch(ZERO, opts.zero || 'zero gradient (dead)'));
    box.appendChild(swatch(SKIPPED, 'skipped'));
    box.appendChild(swatch(MISSING, 'not logged'));
    if (vanish !== null) box.appendChild(swatch(VANISHING, `vanishing: below vanish_threshold = ${fmt(data.vanish_threshold)}`));
    if (explode !== null) box.appendChild(swatch(EXPLODING, `exploding: above explode_threshold = ${fmt(data.explode_threshold)}`));
  }
  return box;
}

// --------------------------------------------------------------- helpers
async function getJSON(url) {
  const response = await fetch(url);
  return response.ok ? response.json() : null;
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function svgText(x, y, text, anchor) {
  const node = svgEl('text', {x, y, 'text-anchor': anchor});
  node.textContent = String(text);
  return node;
}

function swatch(colour, label) {
  return el('span', {}, [el('span', {class: 'gg-swatch', style: `background: ${colour}`}), label]);
}

function colourScale(rows) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const row of rows) for (const v of row) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
  const scale = (v) => {
    const u = Math.max(0, Math.min(1, (v - lo) / (hi - lo))) * (VIRIDIS.length - 1);
    const k = Math.min(VIRIDIS.length - 2, Math.floor(u));
    const f = u - k;
    const c = VIRIDIS[k].map((a, i) => Math.round(a + f * (VIRIDIS[k + 1][i] - a)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  };
  scale.lo = lo;
  scale.hi = hi;
  return scale;
}

function stepAxis(steps, left, cellW) {
  // x of any step (events fall between logging steps): linear between the columns' centres.
  return (step) => {
    if (steps.length < 2) return left + cellW / 2;
    let j = nearest(steps, step);
    if (steps[j] > step && j > 0) j -= 1;
    const k = Math.min(j + 1, steps.length - 1);
    const f = steps[k] === steps[j] ? 0 : (step - steps[j]) / (steps[k] - steps[j]);
    return left + (j + Math.max(0, Math.min(1, f))) * cellW + cellW / 2;
  };
}

function nearest(steps, step) {
  let best = 0;
  steps.forEach((s, j) => { if (Math.abs(s - step) < Math.abs(steps[best] - step)) best = j; });
  return best;
}

function ticks(n) {
  const every = Math.max(1, Math.ceil(n / 10));
  const out = [];
  for (let j = 0; j < n; j += every) out.push(j);
  return out;
}

function hover(svg, tip) {
  svg.addEventListener('mousemove', (e) => {
    const text = e.target.getAttribute && e.target.getAttribute('data-tip');
    if (!text) { tip.style.display = 'none'; return; }
    tip.textContent = text;
    tip.style.left = `${e.clientX + 12}px`;
    tip.style.top = `${e.clientY + 12}px`;
    tip.style.display = 'block';
  });
  svg.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
}

function fmt(v) {
  if (v === null || v === undefined) return '—';
  return Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : String(+v.toPrecision(4));
}
