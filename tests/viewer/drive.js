// Drives the built OHIF viewer as a radiologist would, for tests/test_viewer.py (which checks the answers).
// node drive.js SPEC_JSON   SPEC: {base, study, segments, slices, out, chromium}
// Prints one JSON line: what the viewer showed (segment panel text, the canvas geometry of the chosen
// slices, the SR view's text, console/page errors). Screenshots go to SPEC.out.
const puppeteer = require('puppeteer-core');
const spec = JSON.parse(process.argv[2]);
const sleep = ms => new Promise(r => setTimeout(r, ms));
const result = { errors: [], console: [], steps: [] };

async function clickText(page, texts) {
  // the first visible button-like element whose own text is one of `texts`
  return page.evaluate(texts => {
    const els = [...document.querySelectorAll('button, [role="button"], a, span, div')];
    for (const el of els) {
      const t = (el.innerText || '').trim();
      if (texts.includes(t) && el.offsetParent !== null && el.children.length <= 2) { el.click(); return t; }
    }
    return null;
  }, texts);
}

async function dismiss(page) {
  for (let i = 0; i < 4; i++) {
    if (!(await clickText(page, ['Skip all', 'Skip', 'Close', 'Got it']))) break;
    await sleep(300);
  }
}

async function doubleClickThumbnail(page, modality) {
  // the study browser's entry of the series: the element whose own text is the modality, and its row
  const box = await page.evaluate(modality => {
    const label = [...document.querySelectorAll('div, span')].find(e =>
      e.offsetParent !== null && e.childElementCount === 0 && (e.innerText || '').trim() === modality &&
      e.getBoundingClientRect().x < 300);
    if (!label) return null;
    let row = label;
    while (row.parentElement && row.getBoundingClientRect().height < 30) row = row.parentElement;
    const r = row.getBoundingClientRect();
    return { x: r.x + r.width / 2, y: r.y + r.height / 2 };
  }, modality);
  if (!box) throw new Error(`no ${modality} entry in the study browser`);
  await page.mouse.click(box.x, box.y, { clickCount: 2 });
}

async function waitText(page, pred, timeout, what) {
  const end = Date.now() + timeout;
  while (Date.now() < end) {
    const text = await page.evaluate(() => document.body.innerText);
    if (pred(text)) return text;
    await sleep(500);
  }
  throw new Error(`timed out waiting for ${what}`);
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: spec.chromium, headless: true,
    args: ['--no-sandbox', '--use-angle=swiftshader', '--enable-unsafe-swiftshader', '--ignore-gpu-blocklist',
           '--disable-background-networking', '--disable-component-update', '--no-first-run',
           '--disable-dev-shm-usage', '--window-size=1400,900'],
    defaultViewport: { width: 1400, height: 900, deviceScaleFactor: 1 },
  });
  const page = await browser.newPage();
  page.on('pageerror', e => result.errors.push(String(e && e.message || e)));
  page.on('console', m => { if (m.type() === 'error' || m.type() === 'warn') result.console.push(m.text().slice(0, 300)); });
  try {
    await page.goto(`${spec.base}/viewer?StudyInstanceUIDs=${spec.study}`, { waitUntil: 'networkidle2', timeout: 60000 });
    await page.waitForSelector('canvas', { timeout: 60000 });
    await waitText(page, t => /\bSEG\b/.test(t) && /\bSR\b/.test(t), 60000, 'the study browser');
    await sleep(1500);
    await dismiss(page);
    await page.screenshot({ path: `${spec.out}/1-study.png` });
    result.steps.push('study');

    await doubleClickThumbnail(page, 'SEG');
    // OHIF shows the SEG over its series and asks whether to open (load) it: yes, as a radiologist would
    await waitText(page, t => t.includes('Do you want to open this Segmentation?'), 30000, 'the open-segmentation prompt');
    await clickText(page, ['Yes']);
    await waitText(page, t => !t.includes('Do you want to open this Segmentation?'), 30000, 'the segmentation to load');
    await sleep(2000);
    // the segmentation panel on the right, as a radiologist opens it
    result.tabs = await page.evaluate(() => {
      const tabs = [...document.querySelectorAll('[data-cy$="-btn"]')].map(e => e.getAttribute('data-cy'));
      const seg = document.querySelector('[data-cy$="-btn"][data-cy*="egmentation"]');
      if (seg) seg.click();
      return tabs;
    });
    result.segText = await waitText(page, t => spec.segments.every(s => t.includes(s)), 60000, 'the segments panel');
    await sleep(2000);
    await dismiss(page);
    result.steps.push('seg');

    // each chosen slice: the image-to-canvas geometry of the first viewport, and the canvas alone
    result.views = [];
    for (const [k, sliceUid] of spec.slices.entries()) {
      const view = await page.evaluate(async sliceUid => {
        const cs = window.cornerstone;
        const vp = cs.getEnabledElements()[0].viewport;
        const ids = vp.getImageIds();
        const sop = id => (cs.metaData.get('instance', id) || {}).SOPInstanceUID;
        const index = ids.findIndex(id => sop(id) === sliceUid);
        await cs.utilities.jumpToSlice(vp.element, { imageIndex: index });
        vp.render();
        await new Promise(r => setTimeout(r, 1500));
        const imageId = vp.getCurrentImageId();
        const at = (c, r) => vp.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, [c, r]));
        const canvas = vp.element.querySelector('canvas');
        const rect = canvas.getBoundingClientRect();
        return { index, shown: sop(imageId), origin: at(0, 0), col: at(1, 0), row: at(0, 1),
                 rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height } };
      }, sliceUid);
      // only the canvas: hide text overlays and SVG annotations drawn over it
      await page.evaluate(() => {
        const canvas = window.cornerstone.getEnabledElements()[0].viewport.element.querySelector('canvas');
        const pane = canvas.closest('[data-cy="viewport-pane"]') || document.body;
        for (const el of pane.querySelectorAll('*')) if (el !== canvas && !el.contains(canvas)) el.style.visibility = 'hidden';
      });
      await sleep(500);
      const r = view.rect;
      view.png = `2-seg-canvas-${k}.png`;
      await page.screenshot({ path: `${spec.out}/${view.png}`, clip: { x: r.x, y: r.y, width: r.width, height: r.height } });
      await page.evaluate(() => { for (const el of document.querySelectorAll('[style*="visibility: hidden"]')) el.style.visibility = ''; });
      await page.screenshot({ path: `${spec.out}/3-seg-${k}.png` });
      result.views.push(view);
    }

    await doubleClickThumbnail(page, 'SR');
    await sleep(3000);
    await dismiss(page);
    result.srText = await page.evaluate(() => document.body.innerText);
    await page.screenshot({ path: `${spec.out}/4-sr.png` });
    result.steps.push('sr');
  } catch (e) {
    result.failure = String(e && e.stack || e);
    try { await page.screenshot({ path: `${spec.out}/failure.png` }); } catch (_) {}
  } finally {
    result.finalText = await page.evaluate(() => document.body.innerText).catch(() => '');
    await browser.close();
    console.log(JSON.stringify(result));
  }
})();
