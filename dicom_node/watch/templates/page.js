document.documentElement.dataset.script = 'ran';  // lets a test see that the policy let it run
const csrf = document.querySelector('meta[name=csrf-token]').content;
async function retry(id) {
  const r = await fetch('api/jobs/' + id + '/retry', {method: 'POST', credentials: 'same-origin',
                                                      headers: {'X-CSRF-Token': csrf}});
  document.getElementById('r' + id).textContent = r.ok ? 'queued again' : 'retry refused';
}
document.querySelectorAll('button[data-retry]').forEach(b => b.addEventListener('click', () => retry(b.dataset.retry)));
setTimeout(() => location.reload(), 15000);
