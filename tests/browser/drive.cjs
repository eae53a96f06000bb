// Drive headless Chromium with playwright-core (no browser download: the system's chromium) for the tests.
//   node drive.cjs page URL SHOT       load a run page, wait for every <model-viewer>'s load event, screenshot
//   node drive.cjs app URL SHOT JOB    in the text3d app: an empty prompt (its message), then JOB (JSON: prompt,
//                                      steps, overrides), wait until done, screenshot
//   node drive.cjs resume URL SHOT JOB in the app, Resume JOB.run_dir, wait until done, screenshot
// Prints one JSON object: what it saw (viewer boxes, console errors, requests that left localhost, texts).
// Environment: TEXT3D_PLAYWRIGHT (the playwright-core folder), CHROMIUM (the executable), PROFILE (a fresh folder).
"use strict";
const { chromium } = require(process.env.TEXT3D_PLAYWRIGHT);

const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"];

function local(url) {
  if (/^(data|blob|about|chrome-error):/.test(url)) return true;
  const host = new URL(url).hostname;
  return host === "127.0.0.1" || host === "localhost" || host === "[::1]";
}

// wait for every <model-viewer> under `root` to fire its load event; their boxes after a few more frames
async function loadedViewers(page, root) {
  return page.evaluate(async (root) => {
    await customElements.whenDefined("model-viewer");
    const all = [...document.querySelectorAll(root + " model-viewer")];
    await Promise.all(all.map((mv) => mv.loaded ? true : new Promise((resolve, reject) => {
      mv.addEventListener("load", () => resolve(true));
      mv.addEventListener("error", (e) => reject(new Error("model-viewer error: " + JSON.stringify(e.detail))));
    })));
    for (const mv of all) mv.autoRotate = false;
    await new Promise((r) => setTimeout(r, 1500));  // a few frames after the load event
    return all.map((mv) => {
      const r = mv.getBoundingClientRect();
      return { x: r.x, y: r.y, width: r.width, height: r.height, src: mv.getAttribute("src"),
               visible: mv.modelIsVisible, loaded: mv.loaded };
    });
  }, root);
}

async function viewerPage(page, url, shot) {
  await page.goto(url, { waitUntil: "load" });
  const viewers = await loadedViewers(page, "body");
  await page.screenshot({ path: shot });
  return { viewers };
}

async function appPage(page, url, shot, job) {
  await page.goto(url, { waitUntil: "load" });
  await page.locator("#prompt textarea").waitFor();
  // bad input: the message shows in the page
  await page.locator("#generate").click();
  const toast = page.getByText("the prompt is empty");
  await toast.first().waitFor({ timeout: 30000 });
  const badInput = await toast.first().innerText();
  await page.locator("#prompt textarea").fill(job.prompt);
  await page.locator("#steps input").fill(String(job.steps));
  await page.getByText("advanced: config overrides").click();
  await page.locator("#overrides textarea").fill(job.overrides);
  await page.locator("#generate").click();
  await page.locator("#job_status").getByText("done").waitFor({ timeout: job.timeout_ms || 300000 });
  await page.locator("#model model-viewer").waitFor({ timeout: 60000 });
  const viewers = await loadedViewers(page, "#model");
  const status = await page.locator("#job_status").innerText();
  const runDir = await page.locator("#run_dir textarea, #run_dir input").first().inputValue();
  await page.screenshot({ path: shot });
  return { bad_input: badInput, status, run_dir: runDir, viewers };
}

// resume the run folder RUN in the app (a finished run: re-exported and shown), screenshot
async function appResume(page, url, shot, job) {
  await page.goto(url, { waitUntil: "load" });
  await page.locator("#run_dir textarea, #run_dir input").first().fill(job.run_dir);
  await page.locator("#resume").click();
  await page.locator("#job_status").getByText("done").waitFor({ timeout: job.timeout_ms || 300000 });
  await page.locator("#model model-viewer").waitFor({ timeout: 60000 });
  const viewers = await loadedViewers(page, "#model");
  await page.screenshot({ path: shot });
  return { status: await page.locator("#job_status").innerText(), viewers };
}

(async () => {
  const [mode, url, shot, jobJson] = process.argv.slice(2);
  const context = await chromium.launchPersistentContext(process.env.PROFILE, {
    executablePath: process.env.CHROMIUM, headless: true, args: ARGS, viewport: { width: 1280, height: 1000 },
  });
  const consoleErrors = [], outside = [];
  context.on("request", (req) => { if (!local(req.url())) outside.push(req.url()); });
  const page = context.pages()[0] || await context.newPage();
  page.on("console", (msg) => { if (msg.type() === "error") consoleErrors.push(msg.text()); });
  page.on("pageerror", (err) => consoleErrors.push(String(err)));
  let result = {};
  try {
    const run = { page: viewerPage, app: appPage, resume: appResume }[mode];
    result = await run(page, url, shot, jobJson ? JSON.parse(jobJson) : {});
  } catch (err) {
    result.failure = String(err && err.stack || err);
    await page.screenshot({ path: shot }).catch(() => {});
  }
  result.console_errors = consoleErrors;
  result.outside_requests = outside;
  await context.close();
  process.stdout.write(JSON.stringify(result) + "\n");
})();
